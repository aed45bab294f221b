"""BPE merges <-> tiktoken ranks.

Qwen's vocabulary was trained with tiktoken, so a token's id IS its merge rank, and the HF
files list exactly one merge per multi-byte token, in id order. `ranks_from_vocab_merges`
checks that (anything else could not be reproduced by tiktoken) and `recover_merges` rebuilds
the merge list from the ranks alone, for writing HF files.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from .byte_alphabet import unicode_to_token
from .errors import TokenizerError


def ranks_from_vocab_merges(vocab: Dict[str, int], merges: Sequence[Tuple[str, str]], where: str) -> Dict[bytes, int]:
    """HF byte-level BPE (vocab + ordered merges) -> tiktoken ranks {token bytes: id}.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, HF the pair
    listed first in merges; with rank = id both agree when the merges are in id order, which
    is how Qwen's (tiktoken-trained) vocabulary is laid out. Anything else is an error.
    `vocab` must hold only BPE tokens (added tokens removed).
    """
    ranks: Dict[bytes, int] = {}
    for text, idx in vocab.items():
        if not isinstance(idx, int) or idx < 0:
            raise TokenizerError(f"{where}: token {text!r} has id {idx!r}; expected a non-negative integer")
        ranks[unicode_to_token(text, where)] = idx
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{where}: byte-level vocabulary lacks the single-byte tokens {missing[:8]} (all 256 are needed)")
    previous = -1
    for i, (a, b) in enumerate(merges, 1):
        merged = a + b
        if merged not in vocab:
            raise TokenizerError(f"{where}: merge {i} ({a!r} {b!r}) produces {merged!r}, which is not in the vocabulary")
        idx = vocab[merged]
        if idx <= previous:
            raise TokenizerError(
                f"{where}: merge {i} ({a!r} {b!r}) -> id {idx} comes after id {previous}: merges are not in id order, "
                "so this is not a tiktoken-compatible byte-level BPE vocabulary"
            )
        previous = idx
    return ranks


def _bpe_parts(token: bytes, ranks: Dict[bytes, int], max_rank: int) -> List[bytes]:
    """tiktoken's BPE on `token` using only merges of rank < max_rank."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


def recover_merges(ranks: Dict[bytes, int]) -> List[Tuple[bytes, bytes]]:
    """The merge list of a tiktoken vocabulary, in rank order (one merge per multi-byte token).

    The standard algorithm: BPE each token with only the lower-ranked merges; it stops at
    exactly two parts, and that pair is the merge that created the token.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise TokenizerError(f"token {token!r} (rank {rank}) cannot be built from lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges
