"""Continued pretraining data: tokenise a corpus once (cached, memory-mapped) and split it by
document; packing the documents into blocks is data/packing.py's.

    corpus = load_corpus(["papers/", "notes.jsonl.gz"], tok)        # tokens cached as uint32
    train_docs, val_docs = corpus.split(val_fraction=0.01, seed=0)  # held-out documents
    train = data.pack_documents(train_docs, block_size=2048)        # PackedDataset (data/packing.py)

Every document is followed by <|endoftext|> (151643); there is no BOS.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .cache import CacheWriter, TokenFile, cache_key, cache_root, open_cache
from .errors import DataError, InputReport, check_on_error
from .sources import PathLike, file_kind, find_files, iter_documents

# Cut long documents where Qwen's pre-tokeniser always splits: after a newline that is
# followed by a non-space character (no regex piece spans such a point), so encoding the
# pieces separately (on several threads) gives exactly the ids of encoding the whole text.
_SAFE_CUT = re.compile(r"\n(?=\S)")
CHUNK_CHARS = 1 << 18
BATCH_CHARS = 1 << 22


def split_for_encoding(text: str, max_chars: int = CHUNK_CHARS) -> List[str]:
    """Split `text` into pieces of about `max_chars` at pre-tokeniser-safe points."""
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        m = _SAFE_CUT.search(text, start + max_chars)
        if m is None:
            break
        pieces.append(text[start : m.end()])
        start = m.end()
    pieces.append(text[start:])
    return pieces


def _progress(enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc=desc, unit="char", unit_scale=True, leave=False, dynamic_ncols=True)


def tokenize_file(
    path: PathLike,
    tokenizer,
    text_field: str = "text",
    on_error: str = "raise",
    cache_dir: Optional[PathLike] = None,
    num_threads: Optional[int] = None,
    progress: bool = True,
) -> TokenFile:
    """Tokenise every document of one file (each followed by <|endoftext|>) into a cached TokenFile.

    The cache is keyed by the file's bytes, the tokenizer's fingerprint and the options, so a
    second call returns instantly and an edited file is re-tokenised.
    """
    path = Path(path)
    check_on_error(on_error)
    eos = tokenizer.endoftext_id
    key = cache_key(path, tokenizer.fingerprint(), text_field=text_field, on_error=on_error, eos=eos, kind=file_kind(path))
    final = cache_root(cache_dir) / "tokens" / key
    cached = open_cache(final)
    if cached is not None:
        return cached
    if final.exists():
        # Damaged (files deleted or truncated): rebuild it. Look once more first: another process
        # may have moved a complete cache into place since the first look.
        cached = open_cache(final)
        if cached is not None:
            return cached
        shutil.rmtree(final, ignore_errors=True)

    report = InputReport()
    writer = CacheWriter(final)
    bar = _progress(progress, f"tokenising {path.name}")
    pending: List[List[str]] = []  # documents waiting to be encoded, each as its pieces
    pending_chars = 0

    def flush() -> None:
        nonlocal pending, pending_chars
        flat = [p for doc in pending for p in doc]
        encoded = tokenizer.encode_batch(flat, num_threads=num_threads)
        i = 0
        for doc in pending:
            ids: List[int] = []
            for _ in doc:
                ids.extend(encoded[i])
                i += 1
            ids.append(eos)
            writer.add(np.asarray(ids, dtype=np.uint32))
        if bar is not None:
            bar.update(pending_chars)
        report.kept += len(pending)
        pending, pending_chars = [], 0

    try:
        for _where, text in iter_documents(path, report, text_field=text_field, on_error=on_error):
            pending.append(split_for_encoding(text))
            pending_chars += len(text)
            if pending_chars >= BATCH_CHARS:
                flush()
        if pending:
            flush()
        if report.kept == 0:
            raise DataError(f"{path}: no usable documents ({report.summary()})", "empty")
        return writer.commit({"source": str(path), "text_field": text_field, "report": report.as_dict(),
                              "examples": report.examples})
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()


class Corpus:
    """Tokenised documents of several files; document i is `doc(i)` (uint32, ends with eos)."""

    def __init__(self, files: Sequence[TokenFile]):
        if not files:
            raise DataError("empty corpus: no files", "empty")
        self.files = list(files)
        self._doc_start = np.cumsum([0] + [f.n_docs for f in self.files])
        self._lengths = np.concatenate([f.lengths() for f in self.files]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._doc_start[-1])

    @property
    def n_tokens(self) -> int:
        return int(self._lengths.sum())

    def lengths(self) -> np.ndarray:
        return self._lengths

    def doc(self, i: int) -> np.ndarray:
        f = int(np.searchsorted(self._doc_start, i, side="right")) - 1
        return self.files[f].doc(int(i - self._doc_start[f]))

    def report(self) -> InputReport:
        """Counts over all files (read, kept, skipped by reason), from the cache metadata."""
        total = InputReport()
        for f in self.files:
            r = f.meta.get("report", {})
            part = InputReport(read=r.get("read", 0), kept=r.get("kept", 0))
            part.skipped.update(r.get("skipped", {}))
            part.examples = {k: list(v) for k, v in f.meta.get("examples", {}).items()}
            total.merge(part)
        return total

    def documents(self) -> "Documents":
        return Documents(self, np.arange(len(self), dtype=np.int64))

    def split(self, val_fraction: float = 0.0, seed: int = 0) -> Tuple["Documents", "Documents"]:
        """(train, validation) by whole documents, chosen by a seeded permutation.

        At least one document is held out when val_fraction > 0 and the corpus has two or more.
        """
        return self.documents().split(val_fraction, seed)


class Documents:
    """A selection of a corpus' documents, in a fixed order."""

    def __init__(self, corpus: Corpus, indices: np.ndarray):
        self.corpus = corpus
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def lengths(self) -> np.ndarray:
        return self.corpus.lengths()[self.indices]

    @property
    def n_tokens(self) -> int:
        return int(self.lengths().sum())

    def doc(self, k: int) -> np.ndarray:
        return self.corpus.doc(int(self.indices[k]))

    def split(self, val_fraction: float = 0.0, seed: int = 0) -> Tuple["Documents", "Documents"]:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n = len(self)
        n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, int(round(val_fraction * n))))
        perm = np.random.default_rng(seed).permutation(n)
        val = np.sort(perm[:n_val])
        train = np.sort(perm[n_val:])
        return Documents(self.corpus, self.indices[train]), Documents(self.corpus, self.indices[val])


def load_corpus(
    paths: Union[PathLike, Sequence[PathLike]],
    tokenizer,
    glob: Optional[str] = None,
    text_field: str = "text",
    on_error: str = "raise",
    cache_dir: Optional[PathLike] = None,
    num_threads: Optional[int] = None,
    progress: bool = True,
) -> Corpus:
    """Find the files under `paths` (see data.sources.find_files) and tokenise each (cached)."""
    files = find_files(paths, glob)
    return Corpus([tokenize_file(f, tokenizer, text_field, on_error, cache_dir, num_threads, progress) for f in files])
