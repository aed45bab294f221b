"""The Rust BPE (a tiktoken Encoding) behind every Tokenizer, shared between Tokenizer objects.

Building an Encoding over Qwen's 151643 ranks takes ~0.5 s and holds them in Rust, so
Tokenizers made from the same ranks (the same file content, or `with_added_tokens`) share one:
the ranks are wrapped in a `SharedRanks` object and the Encoding is cached for it. The merge
list, the token byte lengths and the ranks' digest, slow to compute, are cached there too.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import tiktoken

from fileio.hashing import sha256_file


class SharedRanks:
    """BPE ranks {token bytes: id}, hashable by identity, with caches of what is derived from them."""

    def __init__(self, value: Dict[bytes, int]):
        self.value = value
        self.merges: Optional[List[Tuple[bytes, bytes]]] = None
        self._digest: Optional[str] = None
        self._lengths: Optional[List[int]] = None

    def token_lengths(self) -> List[int]:
        """Byte length of every BPE token, indexed by id (0 for ids that are not BPE tokens)."""
        if self._lengths is None:
            lengths = [0] * (max(self.value.values()) + 1)
            for tok, idx in self.value.items():
                lengths[idx] = len(tok)
            self._lengths = lengths
        return self._lengths

    def digest(self) -> str:
        """sha256 over (id, token bytes) in id order (~0.3 s for Qwen; computed once)."""
        if self._digest is None:
            h = hashlib.sha256()
            for tok, idx in sorted(self.value.items(), key=lambda kv: kv[1]):
                h.update(idx.to_bytes(4, "little") + len(tok).to_bytes(2, "little") + tok)
            self._digest = h.hexdigest()
        return self._digest


@functools.lru_cache(maxsize=4)
def bpe_encoding(name: str, ranks_key: int, pattern: str, specials: Tuple[Tuple[str, int], ...], ranks: Any) -> tiktoken.Encoding:
    """The tiktoken Encoding for `ranks` (a SharedRanks; `ranks_key` is its id()) and control tokens."""
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks.value, special_tokens=dict(specials))


_BY_CONTENT: Dict[str, SharedRanks] = {}


def file_version(path: Path) -> Tuple[int, int, int, int]:
    """(device, inode, mtime, size): the same for every name of one file (copies by hard link)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def shared_ranks_of_file(path: Path, ranks: Dict[bytes, int]) -> SharedRanks:
    """One SharedRanks per vocabulary file content (sha256, ~5 ms for Qwen's), so Tokenizers of
    the same vocabulary share an Encoding and the merge list, whichever copy they were read from
    (a saved checkpoint holds the same qwen.tiktoken as the model it came from)."""
    key = sha256_file(path)
    if key not in _BY_CONTENT:
        _BY_CONTENT[key] = SharedRanks(ranks)
    return _BY_CONTENT[key]
