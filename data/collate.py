"""Batching: right padding, and packing several SFT samples into one block.

Batches handed to the training loop are dicts of LongTensors [B, T]: ``input_ids``,
``labels`` and, when the items carry them, ``position_ids`` and ``document_ids``;
``attention_mask`` (1 = real token) when padding was added.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from models.qwen import ENDOFTEXT_ID, IGNORE_INDEX

from .errors import DataError


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


class PackedSFTDataset(torch.utils.data.Dataset):
    """Several SFT samples per block of `block_size` tokens, with document masking.

    Samples are placed greedily in dataset order (a sample that does not fit starts a new
    block); each block is padded to block_size with `pad_id` (label -100, a document id of its
    own). Items: input_ids, labels, position_ids (restart at 0 per sample), document_ids
    (0, 1, ... per sample): LongTensors [block_size]. With document masking the loss of a block
    is the sum of its samples' losses.
    """

    def __init__(self, dataset, block_size: int, pad_id: int = ENDOFTEXT_ID):
        self.dataset = dataset
        self.block_size = int(block_size)
        self.pad_id = pad_id
        lengths = dataset.lengths()
        too_long = np.nonzero(lengths > block_size)[0]
        if len(too_long):
            i = int(too_long[0])
            raise DataError(f"sample {i} has {int(lengths[i])} tokens, more than block_size={block_size} (set max_len <= block_size)", "too-long")
        self.blocks: List[List[int]] = []
        used = block_size + 1
        for i, n in enumerate(lengths.tolist()):
            if used + n > block_size:
                self.blocks.append([])
                used = 0
            self.blocks[-1].append(i)
            used += n

    def __len__(self) -> int:
        return len(self.blocks)

    def lengths(self) -> np.ndarray:
        return np.full(len(self.blocks), self.block_size, dtype=np.int64)

    def fill_ratio(self) -> float:
        """Fraction of block tokens that are real (not padding)."""
        return float(self.dataset.lengths().sum()) / (len(self.blocks) * self.block_size)

    def __getitem__(self, b: int) -> Dict[str, torch.Tensor]:
        T = self.block_size
        ids = torch.full((T,), self.pad_id, dtype=torch.long)
        labels = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros(T, dtype=torch.long)
        doc = torch.zeros(T, dtype=torch.long)
        at = 0
        members = self.blocks[b]
        for d, i in enumerate(members):
            item = self.dataset[i]
            n = item["input_ids"].shape[0]
            ids[at : at + n] = item["input_ids"]
            labels[at : at + n] = item["labels"]
            labels[at] = IGNORE_INDEX  # never predict a sample's first token from the previous one
            pos[at : at + n] = torch.arange(n)
            doc[at : at + n] = d
            at += n
        if at < T:
            pos[at:] = torch.arange(T - at)
            doc[at:] = len(members)
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "document_ids": doc}
