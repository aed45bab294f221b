"""The embedded default's corpus: Python's own documentation, read from the installation.

Every Python installation ships real computer-science text: the docstrings of the standard
library and the language reference topics of ``pydoc_data``. This module turns them into

* a CPT corpus in two parts, for mixing as practitioners do:
  - ``domain``: the docstrings of one family of packages (networking, concurrency, data
    formats: ``json``, ``http``, ``asyncio``, ``email``, ...), the "new domain" of the demo;
  - ``general``: the rest of the standard library's docstrings, the language reference
    topics (``pydoc_data.topics``) and the few ``.rst``/``.txt`` documents that ship with it;
* an SFT set of question/answer pairs built from the same docs ("What does `json.dumps`
  do?" -> the first paragraph of its docstring; "What is the signature of ...?" -> the
  signature), in the messages format, with a held-out split.

Sources are parsed with ``ast`` (never imported: importing ``antigravity`` opens a browser,
``this`` prints, ``tkinter`` needs a display), so the result is deterministic for a given
installation. Files are written once under the cache root (``$QWEN_TUNE_CACHE``, default
``~/.cache/qwen-tune``) in ``pydocs/<key>/``, keyed by the Python version, the stdlib path and
this builder's version; a second call returns the cached paths instantly.

    paths = build()          # PydocsPaths(domain=..., general=..., sft_train=..., sft_eval=...)
    docs = collect()         # list[Document] (name, part, text) without writing anything
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from data import cache_root
from fileio.atomic import dir_mode
from fileio.safe_load import read_json

BUILDER_VERSION = 2

# The "domain" of the demo: networking, concurrency and data-format packages. Everything
# else in the standard library is "general" text used to pretrain the small base model.
DOMAIN_PACKAGES = (
    "asyncio", "concurrent", "multiprocessing", "threading", "queue", "selectors", "socket",
    "socketserver", "ssl", "http", "urllib", "email", "smtplib", "imaplib", "poplib", "ftplib",
    "json", "csv", "xml", "html", "mailbox", "mimetypes", "base64", "binascii", "quopri",
    "sqlite3", "xmlrpc", "wsgiref", "ipaddress", "uuid", "zipfile", "tarfile", "gzip",
)

# Never read: test suites (code, not documentation), GUI/IDE code, demos, vendored packages,
# modules whose only content is a side effect, and the generated/private helpers.
SKIP_TOP = {
    "test", "tests", "idlelib", "tkinter", "turtledemo", "turtle", "lib2to3", "ensurepip",
    "site-packages", "dist-packages", "antigravity", "this", "__phello__", "__hello__",
    "pydoc_data", "config-3.11-x86_64-linux-gnu", "lib-dynload", "distutils", "venv",
}
SKIP_PARTS = {"test", "tests", "idle_test", "__pycache__"}

# Documentation that ships next to the sources (the .rst/.txt of the stdlib, outside tests).
EXTRA_DOCS = ("email/architecture.rst", "idlelib/README.txt", "idlelib/extend.txt")

MIN_DOC_CHARS = 40  # shorter docstrings ("Return self.") carry no domain knowledge


@dataclass(frozen=True)
class Entry:
    """One documented object: `qualname` like 'json.dumps', its signature and docstring."""

    qualname: str
    kind: str  # "module" | "class" | "function" | "method"
    signature: Optional[str]
    doc: str


@dataclass(frozen=True)
class Document:
    """One CPT document: the documentation of one module (or one reference topic)."""

    name: str
    part: str  # "domain" | "general"
    text: str


@dataclass(frozen=True)
class PydocsPaths:
    """Where build() wrote the corpus: .jsonl files with a "text" field / "messages" field."""

    root: Path
    domain: Path
    general: Path
    sft_train: Path
    sft_eval: Path
    stats: dict


# ---------------------------------------------------------------------- locations
def stdlib_dir() -> Path:
    """The directory of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_files(root: Path) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every documentable stdlib source, sorted by name."""
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        parts = rel.parts
        if parts[0].removesuffix(".py") in SKIP_TOP or SKIP_PARTS & set(parts[:-1]):
            continue
        if any(p.startswith(".") for p in parts) or parts[-1].startswith("_sysconfigdata"):
            continue
        mod = ".".join(parts)[:-3]
        if mod.endswith(".__init__"):
            mod = mod[: -len(".__init__")]
        if mod.endswith("__main__"):
            continue
        out.append((mod, path))
    out.sort(key=lambda x: x[0])
    return out


def is_domain(module: str) -> bool:
    return module.split(".")[0] in DOMAIN_PACKAGES


# ---------------------------------------------------------------------- parsing
def _clean(doc: Optional[str]) -> str:
    if not doc:
        return ""
    return textwrap.dedent(doc).strip() if "\n" not in doc else _dedent_docstring(doc)


def _dedent_docstring(doc: str) -> str:
    """PEP 257 trim: first line as is, the rest dedented; surrounding blank lines dropped."""
    lines = doc.expandtabs().splitlines()
    rest = textwrap.dedent("\n".join(lines[1:]))
    return (lines[0].strip() + "\n" + rest).strip()


def _signature(node: ast.AST, name: str) -> str:
    args = ast.unparse(node.args)  # type: ignore[attr-defined]
    ret = f" -> {ast.unparse(node.returns)}" if getattr(node, "returns", None) else ""  # type: ignore[attr-defined]
    return f"{name}({args}){ret}"


def _public(name: str) -> bool:
    return not name.startswith("_") or name in ("__init__", "__call__")


def parse_module(module: str, source: str) -> list[Entry]:
    """The documented public objects of one module's source (no import, no execution)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    entries = []
    mdoc = _clean(ast.get_docstring(tree, clean=False))
    if mdoc:
        entries.append(Entry(module, "module", None, mdoc))

    def visit(body: Iterable[ast.stmt], prefix: str, in_class: bool) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not _public(node.name):
                    continue
                doc = _clean(ast.get_docstring(node, clean=False))
                if not doc:
                    continue
                qual = f"{prefix}.{node.name}"
                entries.append(Entry(qual, "method" if in_class else "function", _signature(node, qual), doc))
            elif isinstance(node, ast.ClassDef):
                if node.name.startswith("_"):
                    continue
                qual = f"{prefix}.{node.name}"
                doc = _clean(ast.get_docstring(node, clean=False))
                init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
                sig = None
                if init is not None:
                    sig = _signature(init, qual).replace("(self, ", "(").replace("(self)", "()")
                if doc:
                    entries.append(Entry(qual, "class", sig, doc))
                visit(node.body, qual, True)

    visit(tree.body, module, False)
    return entries


def iter_entries(root: Optional[Path] = None) -> Iterator[tuple[str, list[Entry]]]:
    """(module, entries) for every stdlib module with at least one docstring."""
    root = root or stdlib_dir()
    for module, path in module_files(root):
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        entries = parse_module(module, source)
        if entries:
            yield module, entries


def module_document(module: str, entries: list[Entry]) -> str:
    """One module's documentation as plain text (module docstring, then each object)."""
    chunks = []
    for e in entries:
        if e.kind == "module":
            chunks.append(f"Module {module}\n\n{e.doc}")
        else:
            head = e.signature or e.qualname
            chunks.append(f"{head}\n\n{e.doc}")
    return "\n\n".join(chunks)


def reference_topics(root: Path) -> list[tuple[str, str]]:
    """(topic, text) of the language reference shipped in pydoc_data/topics.py."""
    path = root / "pydoc_data" / "topics.py"
    if not path.exists():
        return []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return sorted((k, v.strip()) for k, v in topics.items() if v.strip())
    return []


def collect(root: Optional[Path] = None) -> list[Document]:
    """Every CPT document of the installation, deterministic order (domain and general)."""
    root = root or stdlib_dir()
    docs = []
    for module, entries in iter_entries(root):
        text = module_document(module, entries)
        if len(text) >= MIN_DOC_CHARS:
            docs.append(Document(module, "domain" if is_domain(module) else "general", text))
    for topic, text in reference_topics(root):
        docs.append(Document(f"reference:{topic}", "general", text))
    for rel in EXTRA_DOCS:
        path = root / rel
        if path.exists():
            try:
                text = path.read_text(encoding="utf-8").strip()
            except (UnicodeDecodeError, OSError):
                continue
            part = "domain" if is_domain(rel.split("/")[0]) else "general"
            docs.append(Document(f"file:{rel}", part, text))
    return docs


# ---------------------------------------------------------------------- SFT pairs
def first_paragraph(doc: str, max_chars: int = 600) -> str:
    """The first paragraph of a docstring, joined into one line of prose.

    A first paragraph shorter than MIN_DOC_CHARS (often a one-line usage example such as
    "quote('abc def') -> 'abc%20def'") is followed by the second one.
    """
    paras = [p for p in doc.strip().split("\n\n") if p.strip()]
    if not paras:
        return ""
    text = " ".join(line.strip() for line in paras[0].splitlines())
    if len(text) < MIN_DOC_CHARS and len(paras) > 1:
        text += " " + " ".join(line.strip() for line in paras[1].splitlines())
    if len(text) > max_chars:
        cut = text[:max_chars].rsplit(". ", 1)[0]
        text = cut + ("." if not cut.endswith(".") else "")
    return text


def qa_pairs(entries: Iterable[Entry]) -> list[dict]:
    """Question/answer conversations (messages format) from documented objects."""
    out = []
    for e in entries:
        if e.kind == "module":
            answer = first_paragraph(e.doc)
            if len(answer) >= MIN_DOC_CHARS:
                out.append(_chat(f"What is the Python module `{e.qualname}` for?", answer, e.qualname))
            continue
        answer = first_paragraph(e.doc)
        if len(answer) < MIN_DOC_CHARS:
            continue
        what = "class" if e.kind == "class" else "function" if e.kind == "function" else "method"
        out.append(_chat(f"What does the {what} `{e.qualname}` do?", answer, e.qualname))
        if e.signature and e.kind != "class":
            out.append(_chat(f"What is the signature of `{e.qualname}`?", f"`{e.signature}`", e.qualname))
        elif e.signature:
            out.append(_chat(f"How do I construct `{e.qualname}`?", f"Call `{e.signature}`.", e.qualname))
    return out


def _chat(question: str, answer: str, source: str) -> dict:
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "source": source,
    }


def held_out(name: str, fraction: float) -> bool:
    """Deterministic split by object name (all questions about one object go together)."""
    h = int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


# ---------------------------------------------------------------------- build + cache
def cache_key(root: Path) -> str:
    ident = f"{sys.version_info[:3]}|{root.resolve()}|v{BUILDER_VERSION}|{','.join(DOMAIN_PACKAGES)}"
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:12]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def build(
    cache_dir: Optional[os.PathLike] = None,
    root: Optional[os.PathLike] = None,
    eval_fraction: float = 0.05,
    sft_part: str = "domain",
) -> PydocsPaths:
    """Write (once) and return the corpus files under `cache_dir` (default: cache root).

    domain.jsonl / general.jsonl: {"text", "name"} per document; sft_train.jsonl /
    sft_eval.jsonl: {"messages", "source"} conversations about the `sft_part` objects
    ("domain", "general" or "all"), split by object name with `eval_fraction` held out.
    The directory is completed atomically (temp dir + rename), so a crash leaves no half
    corpus behind.
    """
    root = Path(root) if root else stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: the standard library directory does not exist")
    base = Path(cache_dir) if cache_dir else cache_root() / "pydocs"
    out = base / f"{cache_key(root)}-{sft_part}-{eval_fraction:g}"
    paths = PydocsPaths(
        out, out / "domain.jsonl", out / "general.jsonl", out / "sft_train.jsonl", out / "sft_eval.jsonl", {}
    )
    stats_file = out / "stats.json"
    if stats_file.exists():
        stats = read_json(stats_file, ValueError, dict)
        return PydocsPaths(paths.root, paths.domain, paths.general, paths.sft_train, paths.sft_eval, stats)

    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pydocs-", dir=base))
    os.chmod(tmp, dir_mode())   # readable by whoever may read the cache, as mkdir would make it
    try:
        docs = collect(root)
        stats = {"python": sys.version.split()[0], "stdlib": str(root), "builder_version": BUILDER_VERSION}
        for part in ("domain", "general"):
            rows = [{"text": d.text, "name": d.name} for d in docs if d.part == part]
            if not rows:
                raise RuntimeError(f"{root}: no {part} documents found in the standard library")
            _write_jsonl(tmp / f"{part}.jsonl", rows)
            stats[f"{part}_documents"] = len(rows)
            stats[f"{part}_chars"] = sum(len(r["text"]) for r in rows)
        train, evals = [], []
        for module, entries in iter_entries(root):
            if sft_part != "all" and ("domain" if is_domain(module) else "general") != sft_part:
                continue
            for ex in qa_pairs(entries):
                (evals if held_out(ex["source"], eval_fraction) else train).append(ex)
        stats["sft_train"] = _write_jsonl(tmp / "sft_train.jsonl", train)
        stats["sft_eval"] = _write_jsonl(tmp / "sft_eval.jsonl", evals)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        if out.exists():  # another process finished first: keep theirs
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PydocsPaths(paths.root, paths.domain, paths.general, paths.sft_train, paths.sft_eval, stats)


def domain_documents(max_chars: Optional[int] = None) -> list[str]:
    """The "domain" module documents, in order (the first ones up to about `max_chars`
    characters; None: all of them): the corpus extend_vocab.py mines by default."""
    docs: list[str] = []
    chars = 0
    for module, path in module_files(stdlib_dir()):
        if max_chars is not None and chars >= max_chars:
            break
        if not is_domain(module):
            continue
        try:
            entries = parse_module(module, path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        text = module_document(module, entries) if entries else ""
        if len(text) >= MIN_DOC_CHARS:
            docs.append(text)
            chars += len(text)
    if not docs:
        raise ValueError(f"{stdlib_dir()}: no domain documents found in the standard library")
    return docs


def preference_pairs(paths: "PydocsPaths", seed: int = 0) -> tuple[Path, Path]:
    """(train, held-out) preference pairs for the demo's DPO stage, derived from its SFT sets: the
    real answer is chosen, the answer to a different question rejected (data.pairs_from_sft).
    Written once beside the SFT files; returns their paths."""
    from data import InputReport
    from data.preference import pairs_from_sft
    from data.sources import iter_jsonl

    out = []
    for source in (paths.sft_train, paths.sft_eval):
        target = source.with_name(source.stem.replace("sft_", "pairs_") + ".jsonl")
        if not target.is_file():
            records = [record for _, record in iter_jsonl(source, InputReport())]
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            _write_jsonl(tmp, pairs_from_sft(records, seed=seed))
            os.replace(tmp, target)
        out.append(target)
    return out[0], out[1]


def looped(answer: str) -> str:
    """The answer as a small model's greedy decoding degenerates: its first words (up to 4, at most
    half of them) repeated, a little longer than the answer (at least 3 times)."""
    words = answer.split()
    k = max(1, min(4, len(words) // 2))
    n = max(len(words), 2 * k) + k
    return " ".join((words[:k] * (n // k + 1))[:n])


KTO_HELD_OUT_QUESTIONS = 32   # held-out rows: 2 per question (2 CPU cores: four evaluations of 64 rows)


def kto_rows(paths: "PydocsPaths") -> tuple[Path, Path]:
    """(train, held-out) unpaired rows for the demo's KTO stage, from its SFT sets: for every
    question its real answer (label true) and the same answer degenerated into a repetition
    loop (looped(); label false), so the labels are balanced and no text is both desirable and
    undesirable. The held-out file keeps the first KTO_HELD_OUT_QUESTIONS questions. Written once
    beside the SFT files (TRL's prompt / completion / label format); returns their paths."""
    from data import InputReport
    from data.sources import iter_jsonl

    out = []
    for source, limit in ((paths.sft_train, None), (paths.sft_eval, KTO_HELD_OUT_QUESTIONS)):
        target = source.with_name(source.stem.replace("sft_", "kto_") + ".jsonl")
        if not target.is_file():
            rows = []
            for _, record in iter_jsonl(source, InputReport()):
                if limit is not None and len(rows) >= 2 * limit:
                    break
                prompt, answer = record["messages"][:-1], record["messages"][-1]["content"]
                rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": answer}], "label": True})
                rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": looped(answer)}],
                             "label": False})
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            _write_jsonl(tmp, rows)
            os.replace(tmp, target)
        out.append(target)
    return out[0], out[1]


def main() -> None:  # python -m demo.corpus: build and print where the corpus is
    p = build()
    print(json.dumps({"root": str(p.root), **p.stats}, indent=2))


if __name__ == "__main__":
    main()
