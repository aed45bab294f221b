"""Mixing several sources by ratio of tokens (e.g. general:domain = 1:1 to limit forgetting).

    mixed = MixedDataset([general_blocks, domain_blocks], ratios=[1, 1], seed=0)
    print(mixed.summary())

Each source must have lengths() (tokens per item: PackedDataset, SFTDataset, Subset, ...).
The token budget defaults to the largest one that needs no repetition of any source; with
`total_tokens` larger than that, smaller sources are repeated (each pass a fresh seeded
permutation). Source i contributes items, in a seeded order, until it reaches
total * ratio_i / sum(ratios) tokens (at least one item).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch


class MixedDataset(torch.utils.data.Dataset):
    """Items of several datasets, chosen to match token ratios. Item j = sources[s][i]."""

    def __init__(
        self,
        sources: Sequence,
        ratios: Sequence[float],
        seed: int = 0,
        total_tokens: Optional[int] = None,
        names: Optional[Sequence[str]] = None,
    ):
        if len(sources) != len(ratios) or not sources:
            raise ValueError(f"need one ratio per source: {len(sources)} sources, {len(ratios)} ratios")
        if any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise ValueError(f"ratios must be >= 0 with a positive sum, got {list(ratios)}")
        self.sources = list(sources)
        self.names = list(names) if names is not None else [f"source{i}" for i in range(len(sources))]
        shares = np.asarray(ratios, dtype=np.float64) / float(sum(ratios))
        lengths = [np.asarray(s.lengths(), dtype=np.int64) for s in self.sources]
        totals = np.asarray([int(x.sum()) for x in lengths], dtype=np.float64)
        if total_tokens is None:
            total_tokens = int(min(totals[i] / shares[i] for i in range(len(shares)) if shares[i] > 0))
        self.total_tokens = int(total_tokens)
        self.shares = shares
        picks_src: List[np.ndarray] = []
        picks_idx: List[np.ndarray] = []
        picks_len: List[np.ndarray] = []
        self.tokens = []
        self.passes = []
        for s, (share, lens) in enumerate(zip(shares, lengths)):
            target = share * self.total_tokens
            if share == 0 or len(lens) == 0:
                self.tokens.append(0)
                self.passes.append(0.0)
                continue
            rng = np.random.default_rng([seed, s])
            order, got, taken = [], 0, 0
            while got < target or taken == 0:
                perm = rng.permutation(len(lens))
                cum = np.cumsum(lens[perm])
                need = target - got
                k = int(np.searchsorted(cum, need, side="left")) + 1  # items to reach `need`
                k = max(1, min(k, len(perm)))
                order.append(perm[:k])
                got += int(cum[k - 1])
                taken += k
            idx = np.concatenate(order)
            picks_src.append(np.full(len(idx), s, dtype=np.int64))
            picks_idx.append(idx)
            picks_len.append(lens[idx])
            self.tokens.append(got)
            self.passes.append(taken / len(lens))
        self._src = np.concatenate(picks_src)
        self._idx = np.concatenate(picks_idx)
        self._lengths = np.concatenate(picks_len)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, j: int):
        return self.sources[int(self._src[j])][int(self._idx[j])]

    def lengths(self) -> np.ndarray:
        return self._lengths

    def source_of(self, j: int) -> int:
        return int(self._src[j])

    def summary(self) -> str:
        """One line per source: tokens, share of the mix, and passes over the source."""
        total = max(1, sum(self.tokens))
        return "; ".join(
            f"{n}: {t} tokens ({t / total:.1%}, {p:.2f} passes)" for n, t, p in zip(self.names, self.tokens, self.passes)
        )
