"""Finding and reading data files: .txt, .jsonl and .jsonl.gz, files or directories.

Every problem is a `DataError` naming the file and line: a path that does not exist, a
directory with no matching files, an empty file, bytes that are not UTF-8, malformed JSON, a
record that is not an object or lacks the text field.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from fileio.safe_load import loads_json

from .errors import DataError, InputReport

PathLike = Union[str, os.PathLike]
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".txt.gz", ".json.gz", ".json")


def file_kind(path: Path) -> str:
    """'txt' for .txt/.txt.gz (one document per file), 'jsonl' for .jsonl/.jsonl.gz/.json."""
    name = path.name.lower()
    if name.endswith((".txt", ".txt.gz")):
        return "txt"
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        return "jsonl"
    raise DataError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})", "unsupported")


def find_files(paths: Union[PathLike, Sequence[PathLike]], glob: Optional[str] = None) -> List[Path]:
    """Expand files and directories (recursively, filtered by `glob`, e.g. "*.jsonl") into files.

    Order: the order of `paths`, each directory's files sorted by path (deterministic).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no data paths given", "empty")
    out: List[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            file_kind(p)
            out.append(p)
        elif p.is_dir():
            pattern = glob or "*"
            found = sorted(f for f in p.rglob(pattern) if f.is_file() and f.name.lower().endswith(SUFFIXES))
            if not found:
                raise DataError(f"{p}: directory has no files matching {pattern!r} with a supported suffix {SUFFIXES}", "empty")
            out.extend(found)
        else:
            raise DataError(f"{p}: no such file or directory", "missing")
    return out


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def read_bytes(path: Path) -> bytes:
    """The file's bytes (gunzipped for .gz); a corrupt gzip names the file."""
    try:
        with _open_binary(path) as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})", "unreadable") from None


def decode_utf8(raw: bytes, path: Path, first_line: int = 1) -> str:
    """Strict UTF-8 decoding; an error names the line and column of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {col}); convert the file to UTF-8",
            "not-utf8",
        ) from None


def iter_jsonl(path: Path, report: InputReport, on_error: str = "raise") -> Iterator[Tuple[int, dict]]:
    """(line number, JSON object) for every non-blank line of a .jsonl(.gz) file, streamed.

    A .json file holding one JSON array of objects is accepted too (line = array index + 1).
    """
    if path.name.lower().endswith((".json", ".json.gz")):
        raw = read_bytes(path)
        if raw.lstrip()[:1] == b"[":
            yield from _iter_json_array(path, raw, report, on_error)
            return
    seen = False
    try:
        with _open_binary(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                seen = True
                report.read += 1
                try:
                    obj = _parse_line(path, lineno, line)
                except DataError as err:
                    report.handle(err, on_error)
                    continue
                yield lineno, obj
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})", "unreadable") from None
    if not seen:
        raise DataError(f"{path}: empty file (no records)", "empty")


def _parse_line(path: Path, lineno: int, line: bytes) -> dict:
    text = decode_utf8(line, path, lineno)
    try:
        obj = loads_json(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})", "malformed-json") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}", "not-object")
    return obj


def _iter_json_array(path: Path, raw: bytes, report: InputReport, on_error: str) -> Iterator[Tuple[int, dict]]:
    try:
        items = loads_json(decode_utf8(raw, path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})", "malformed-json") from None
    if not items:
        raise DataError(f"{path}: empty JSON array (no records)", "empty")
    for i, obj in enumerate(items, 1):
        report.read += 1
        if not isinstance(obj, dict):
            report.handle(DataError(f"{path}: item {i}: expected a JSON object, got {type(obj).__name__}", "not-object"), on_error)
            continue
        yield i, obj


def iter_documents(
    path: Path,
    report: InputReport,
    text_field: str = "text",
    on_error: str = "raise",
) -> Iterator[Tuple[str, str]]:
    """(location, text) of every document in a file: a .txt file is one document; a .jsonl
    line is one document, its text in `text_field`. Empty documents are skipped and counted."""
    kind = file_kind(path)
    if kind == "txt":
        raw = read_bytes(path)
        report.read += 1
        if not raw.strip():
            raise DataError(f"{path}: empty file (no text)", "empty")
        try:
            text = decode_utf8(raw, path)
        except DataError as err:
            report.handle(err, on_error)
            return
        yield str(path), text
        return
    n = 0
    for lineno, obj in iter_jsonl(path, report, on_error):
        where = f"{path}:{lineno}"
        if text_field not in obj:
            report.handle(DataError(f"{where}: missing field {text_field!r} (keys: {sorted(obj)[:8]})", "missing-field"), on_error)
            continue
        text = obj[text_field]
        if not isinstance(text, str):
            report.handle(DataError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}", "bad-field"), on_error)
            continue
        if not text:
            report.skipped["empty-document"] += 1
            continue
        n += 1
        yield where, text
