"""Pretrain on the token ids a corpus actually uses, then grow back to the full vocabulary.

Qwen's vocabulary has 151936 rows; a small corpus uses a few percent of them (the Python
documentation: ~16K ids). For a small model the [vocab, hidden] head is almost all of the
training cost, so pretraining it from scratch over ids that never occur wastes ~90% of the
compute. Here the model is trained with a compact vocabulary, then its rows are scattered
back to their real ids:

    ids = used_ids([train_blocks, held_out], always=[151643, 151644, 151645])
    small = Qwen(replace(config, vocab_size=padded_rows(len(ids))))
    fit(small, RemappedDataset(train_blocks, ids))            # any trainer
    model = expand_vocabulary(small, ids, config)             # full-vocabulary Qwen

Rows of ids the corpus never used get one shared row (`unused_row`: pointing away from the
model's typical final hidden state, so their logits are low), or zero (logit 0 for every
input: the expanded model then leaks probability to them until full-vocabulary training
pushes them down). Either way the held-out loss before and after growing tells the cost.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Optional, Sequence

import torch

from .rows import ROW_MULTIPLE


def used_ids(datasets: Iterable[Sequence], always: Iterable[int] = ()) -> torch.Tensor:
    """Sorted unique token ids [n] (int64) in the `input_ids` of every item, plus `always`."""
    seen = torch.zeros(0, dtype=torch.int64)
    parts = [torch.as_tensor(list(always), dtype=torch.int64)]
    for ds in datasets:
        for i in range(len(ds)):
            parts.append(ds[i]["input_ids"].reshape(-1).to(torch.int64))
            if len(parts) > 256:
                seen = torch.unique(torch.cat([seen] + parts))
                parts = []
    return torch.unique(torch.cat([seen] + parts))


def padded_rows(n_ids: int, multiple: int = ROW_MULTIPLE) -> int:
    """Rows of the compact embedding: n_ids rounded up to a multiple (matmul-friendly)."""
    return -(-n_ids // multiple) * multiple


def compact_table(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[vocab_size] int64: real id -> compact id, -1 where the id is not in `ids`."""
    table = torch.full((vocab_size,), -1, dtype=torch.int64)
    table[ids] = torch.arange(len(ids))
    return table


class RemappedDataset:
    """A view of a token dataset with ids in the compact vocabulary of `ids`.

    Items are dicts as the wrapped dataset returns them; `input_ids` and `labels` (-100 kept)
    are remapped, every other field is passed through. An id outside `ids` is an error.
    """

    def __init__(self, dataset: Sequence, ids: torch.Tensor):
        self.dataset = dataset
        self.table = compact_table(ids, int(ids.max()) + 1)

    def __len__(self) -> int:
        return len(self.dataset)

    def _map(self, t: torch.Tensor, key: str, index: int) -> torch.Tensor:
        keep = t >= 0
        if (t[keep] >= len(self.table)).any() or (self.table[t[keep]] < 0).any():
            raise ValueError(f"item {index}: {key} holds a token id outside the compact vocabulary")
        out = t.clone().to(torch.int64)
        out[keep] = self.table[t[keep]]
        return out.to(t.dtype)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        for key in ("input_ids", "labels"):
            if key in item:
                item[key] = self._map(item[key], key, index)
        return item


@torch.no_grad()
def unused_row(small: torch.nn.Module, batches: Iterable[dict], target_logit: float = -12.0,
               quantile: float = 0.01) -> Optional[torch.Tensor]:
    """A row [hidden] for the ids `small` never saw, or None when no good one exists.

    u = -c · m̂ with m̂ the mean direction of small's final hidden states over `batches`
    (compact-vocabulary ids), and c chosen so that h·u <= target_logit for all but `quantile`
    of those positions: the ~138K unused ids then take a few percent of the probability mass
    instead of most of it (a zero row gives them logit 0). None when the hidden states do
    not share a direction (the quantile of h·m̂ is not positive)."""
    hidden = torch.cat([small.hidden_states(b["input_ids"]).reshape(-1, small.config.hidden_size).float()
                        for b in batches])
    direction = hidden.mean(0)
    direction = direction / direction.norm().clamp_min(1e-12)
    low = torch.quantile(hidden @ direction, quantile)
    if low <= 0:
        return None
    return direction * (target_logit / low)


@torch.no_grad()
def expand_vocabulary(small: torch.nn.Module, ids: torch.Tensor, config,
                      fill: Optional[torch.Tensor] = None) -> torch.nn.Module:
    """A Qwen of `config` (the full vocabulary) with `small`'s weights; small's row k becomes
    row ids[k] of the embedding (and of an untied head); every other row is `fill` [hidden]
    (default zero; see `unused_row`)."""
    from models.qwen import Qwen

    if small.config.vocab_size < len(ids):
        raise ValueError(f"the small model has {small.config.vocab_size} rows for {len(ids)} ids")
    if int(ids.max()) >= config.vocab_size:
        raise ValueError(f"id {int(ids.max())} does not fit a vocabulary of {config.vocab_size}")
    if replace(small.config, vocab_size=config.vocab_size) != config:
        raise ValueError("the small model's config differs from the target config in more than vocab_size")
    big = Qwen(config).to(small.dtype)
    state = small.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state and not (key == "lm_head.weight" and big.is_tied):
            rows = torch.zeros(config.vocab_size, state[key].shape[1], dtype=state[key].dtype)
            if fill is not None:
                rows[:] = fill.to(rows.dtype)
            rows[ids] = state[key][: len(ids)]
            state[key] = rows
    if big.is_tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = big.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (big.is_tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"expand_vocabulary: missing {missing}, unexpected {unexpected}")
    return big
