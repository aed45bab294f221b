"""Batching: right padding (packing several samples into one block: data/packing.py).

Batches handed to the training loop are dicts of LongTensors [B, T]: ``input_ids``,
``labels`` and, when the items carry them, ``position_ids`` and ``document_ids``;
``attention_mask`` (1 = real token) when padding was added.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from models.qwen import ENDOFTEXT_ID, IGNORE_INDEX


def pad_collate(
    items: Sequence[Dict[str, torch.Tensor]],
    pad_id: int = ENDOFTEXT_ID,
    pad_to_multiple_of: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Stack items [L_i] into [B, T], right-padding with `pad_id` and label -100.

    Padding is marked by position, never by comparing ids, so an <|endoftext|> label that is
    also the pad id keeps its label. attention_mask is added only when some row is padded.
    Padded document_ids get a document of their own (max + 1) so they attend to no real token;
    padded position_ids continue from 0.
    """
    if not items:
        raise ValueError("pad_collate: empty batch")
    lengths = [int(it["input_ids"].shape[0]) for it in items]
    T = max(lengths)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(items)
    keys = list(items[0].keys())
    for it in items:
        if list(it.keys()) != keys:
            raise ValueError(f"pad_collate: items have different keys ({keys} vs {list(it.keys())})")
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "position_ids": 0, "document_ids": 0, "attention_mask": 0}
    out = {k: torch.full((B, T), fill.get(k, 0), dtype=torch.long) for k in keys}
    for b, (it, n) in enumerate(zip(items, lengths)):
        for k in keys:
            out[k][b, :n] = it[k]
        if "document_ids" in it and n < T:
            out["document_ids"][b, n:] = int(it["document_ids"].max()) + 1
    if any(n < T for n in lengths) and "attention_mask" not in out:
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, n in enumerate(lengths):
            mask[b, :n] = 1
        out["attention_mask"] = mask
    return out
