"""Memory-mapped token caches: one directory per (file content, tokenizer, options).

Layout under ``cache_root()/tokens/<key>/``: ``tokens.u32`` (raw little-endian uint32 ids of
all documents, each followed by its end token), ``offsets.npy`` (int64 [n_docs + 1], document
i is tokens[offsets[i]:offsets[i+1]]), ``meta.json`` (source, counts, the input report).
A cache is written into a temporary directory and renamed into place, so a crash never leaves
a half-written cache that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from fileio.atomic import dir_mode
from fileio.hashing import sha256_file
from fileio.safe_load import read_json

CACHE_VERSION = 1
ENV_VAR = "QWEN_TUNE_CACHE"


def cache_root(root: Optional[os.PathLike] = None) -> Path:
    """`root`, else $QWEN_TUNE_CACHE, else ~/.cache/qwen-tune."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "qwen-tune")


def cache_key(path: Path, tokenizer_fingerprint: str, **options) -> str:
    """Key of a file's token cache: its content, the tokenizer, the options that change ids."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, sha256_file(path), tokenizer_fingerprint, sorted(options.items())]).encode())
    return h.hexdigest()[:32]


@dataclass
class TokenFile:
    """The tokenised documents of one source file (memory-mapped, read-only).

    tokens: uint32 [n_tokens]; offsets: int64 [n_docs + 1]; meta: what meta.json holds.
    """

    path: Path
    tokens: np.ndarray
    offsets: np.ndarray
    meta: dict

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def open_cache(directory: Path) -> Optional[TokenFile]:
    """The cache in `directory`, or None when it is missing or incomplete."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = read_json(meta_path)
        offsets = np.load(directory / "offsets.npy", allow_pickle=False)
        n = int(offsets[-1])
        if n == 0:
            tokens = np.zeros(0, dtype=np.uint32)
        else:
            tokens = np.memmap(directory / "tokens.u32", dtype=np.uint32, mode="r", shape=(n,))
    except (OSError, ValueError, KeyError, IndexError):
        return None
    if meta.get("version") != CACHE_VERSION or meta.get("n_tokens") != n:
        return None
    return TokenFile(directory, tokens, offsets, meta)


class CacheWriter:
    """Append documents' tokens to a new cache; `commit()` moves it into place atomically."""

    def __init__(self, final_dir: Path):
        self.final_dir = final_dir
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=final_dir.name + ".tmp-", dir=final_dir.parent))
        os.chmod(self.tmp_dir, dir_mode())   # mkdtemp makes it 0o700; the cache may be shared
        self._f = open(self.tmp_dir / "tokens.u32", "wb")
        self._offsets = [0]

    def add(self, ids: np.ndarray) -> None:
        """One document's ids (already ending with its end token)."""
        arr = np.asarray(ids, dtype=np.uint32)
        self._f.write(arr.astype("<u4", copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + len(arr))

    def commit(self, meta: dict) -> TokenFile:
        self._f.close()
        offsets = np.asarray(self._offsets, dtype=np.int64)
        np.save(self.tmp_dir / "offsets.npy", offsets, allow_pickle=False)
        meta = dict(meta, version=CACHE_VERSION, n_tokens=int(offsets[-1]), n_docs=len(offsets) - 1)
        (self.tmp_dir / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(self.tmp_dir, self.final_dir)
        except OSError:
            if not self.final_dir.exists():
                raise
            shutil.rmtree(self.tmp_dir, ignore_errors=True)  # another process (rank) finished first: keep theirs
        cache = open_cache(self.final_dir)
        if cache is None:
            raise RuntimeError(f"{self.final_dir}: token cache unreadable right after writing it")
        return cache

    def abort(self) -> None:
        self._f.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
