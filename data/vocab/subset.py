"""Pretrain on the token ids a corpus actually uses, then grow back to the full vocabulary.

Qwen's vocabulary has 151936 rows; a small corpus uses a few percent of them (the Python
documentation: ~17K ids). For a small model the [vocab, hidden] head is almost all of the
training cost, so pretraining it from scratch over ids that never occur wastes ~90% of the
compute. Here the model trains with a compact vocabulary: one row per used id, plus one row
that all the other ids share, whose logit counts log(number of other ids) extra. That is
exactly the full-vocabulary softmax of a model whose unused rows are all equal, so growing
back (scattering the rows to their real ids, the shared row to every other id) changes no
loss and no probability:

    ids = used_ids([train_blocks, held_out], always=[ENDOFTEXT_ID, IM_START_ID, IM_END_ID])
    small = Qwen(replace(config, vocab_size=compact_rows(len(ids))))
    small.logit_offset = compact_logit_offset(len(ids), config.vocab_size, small.config.vocab_size)
    fit(small, RemappedDataset(train_blocks, ids))            # any trainer
    model = expand_vocabulary(small, ids, config)             # full-vocabulary Qwen, same function
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterable, Sequence

import torch

from .rows import ROW_MULTIPLE, rows_for


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


def compact_rows(n_ids: int, multiple: int = ROW_MULTIPLE) -> int:
    """Rows of the compact embedding: n_ids + the shared row, rounded up to a multiple."""
    return rows_for(n_ids + 1, 0, multiple)


def compact_logit_offset(n_ids: int, vocab_size: int, rows: int) -> torch.Tensor:
    """fp32 [rows] for `Qwen.logit_offset`: 0 on the n_ids used rows, log(vocab_size - n_ids) on
    the shared row (row n_ids), -inf on the padding rows after it (they are no id)."""
    if vocab_size <= n_ids or rows <= n_ids:
        raise ValueError(f"{n_ids} ids need a vocabulary above {n_ids} and at least {n_ids + 1} rows")
    offset = torch.full((rows,), float("-inf"))
    offset[:n_ids] = 0.0
    offset[n_ids] = math.log(vocab_size - n_ids)
    return offset


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
def expand_vocabulary(small: torch.nn.Module, ids: torch.Tensor, config) -> torch.nn.Module:
    """A Qwen of `config` (the full vocabulary) computing `small`'s function: small's row k
    becomes row ids[k] of the embedding (and of an untied head), its shared row (row len(ids))
    every other row."""
    from models.qwen import Qwen

    if small.config.vocab_size < len(ids) + 1:
        raise ValueError(f"the small model has {small.config.vocab_size} rows for {len(ids)} ids + the shared row")
    if int(ids.max()) >= config.vocab_size:
        raise ValueError(f"id {int(ids.max())} does not fit a vocabulary of {config.vocab_size}")
    if replace(small.config, vocab_size=config.vocab_size) != config:
        raise ValueError("the small model's config differs from the target config in more than vocab_size")
    big = Qwen(config).to(small.dtype)
    state = small.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state and not (key == "lm_head.weight" and big.is_tied):
            rows = state[key][len(ids)].expand(config.vocab_size, -1).clone()  # the shared row everywhere
            rows[ids] = state[key][: len(ids)]
            state[key] = rows
    if big.is_tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = big.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (big.is_tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"expand_vocabulary: missing {missing}, unexpected {unexpected}")
    return big
