"""Packing: several token sequences per fixed-length block, with document masking.

One packer for both stages: a block is a list of fragments (ids, labels), laid end to end by
`pack_block`. What a fragment is differs:

    blocks = pack_documents(train_docs, block_size=2048)   # CPT: the documents' concatenation, cut
                                                           # every block_size tokens (PackedDataset)
    packed = PackedSFTDataset(sft, block_size=2048)        # SFT: whole samples placed greedily,
                                                           # each block padded to block_size

Items: dicts of LongTensors [block_size]: input_ids, labels, position_ids (restarting at 0 at
every fragment), document_ids (0, 1, ... per fragment; padding gets a document of its own).
The label of each fragment's first token is -100: predicting a document's first token from
the previous one is the one cross-document term, and dropping it makes the loss of a block
exactly the sum of the losses of its fragments run on their own (tests/data/test_packing_loss.py
checks this against transformers). CPT with document_mask=False gives plain concatenation
(input_ids and labels only, labels = input_ids).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

from models.qwen import ENDOFTEXT_ID, IGNORE_INDEX

from .cpt import Corpus, Documents
from .errors import DataError

Fragment = Tuple[np.ndarray, np.ndarray]  # (ids int64 [n], labels int64 [n])


def pack_block(fragments: Sequence[Fragment], block_size: int, pad_id: int = ENDOFTEXT_ID) -> Dict[str, torch.Tensor]:
    """Lay `fragments` end to end in one block of `block_size` tokens, with document masking.

    Returns input_ids, labels, position_ids, document_ids: LongTensors [block_size]. Fragment d
    gets document id d, positions 0..n_d-1 and its first label -100; the tail after the last
    fragment is padding: `pad_id`, label -100, positions from 0, document id len(fragments).
    """
    T = int(block_size)
    ids = np.full(T, pad_id, dtype=np.int64)
    labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros(T, dtype=np.int64)
    doc = np.zeros(T, dtype=np.int64)
    at = 0
    for d, (frag_ids, frag_labels) in enumerate(fragments):
        n = len(frag_ids)
        if at + n > T:
            raise ValueError(f"pack_block: fragments hold more than block_size={T} tokens")
        ids[at : at + n] = frag_ids
        labels[at : at + n] = frag_labels
        labels[at] = IGNORE_INDEX  # never predict a fragment's first token from the previous one
        pos[at : at + n] = np.arange(n)
        doc[at : at + n] = d
        at += n
    if at < T:
        pos[at:] = np.arange(T - at)
        doc[at:] = len(fragments)
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos), "document_ids": torch.from_numpy(doc)}


class PackedDataset(torch.utils.data.Dataset):
    """CPT: fixed-length blocks over the concatenation of documents (each ending with eos).

    Block b covers tokens [b*T, (b+1)*T) of the concatenation; the tail shorter than T is
    dropped (`dropped_tokens`). A document cut by a block boundary continues as the first
    fragment of the next block. `documents`: anything with lengths() and doc(k) (a Corpus,
    Documents). Items: see the module docstring; every block is full (no padding).
    """

    def __init__(self, documents: Union[Documents, Corpus], block_size: int, document_mask: bool = True):
        if isinstance(documents, Corpus):
            documents = documents.documents()
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        self.documents = documents
        self.block_size = int(block_size)
        self.document_mask = document_mask
        lengths = documents.lengths()
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        total = int(self._starts[-1])
        self.n_blocks = total // self.block_size
        self.dropped_tokens = total - self.n_blocks * self.block_size
        if self.n_blocks == 0:
            raise DataError(
                f"corpus too small: {total} tokens in {len(documents)} documents, fewer than one block of {block_size}",
                "too-small",
            )

    def __len__(self) -> int:
        return self.n_blocks

    def lengths(self) -> np.ndarray:
        """Tokens per item (all blocks are full): for mixing by token budget."""
        return np.full(self.n_blocks, self.block_size, dtype=np.int64)

    def fragments(self, b: int) -> List[np.ndarray]:
        """The pieces of documents block b holds, in order (int64 arrays, lengths summing to T)."""
        if not 0 <= b < self.n_blocks:
            raise IndexError(f"block {b} out of range [0, {self.n_blocks})")
        T = self.block_size
        lo = b * T
        k = int(np.searchsorted(self._starts, lo, side="right")) - 1
        out: List[np.ndarray] = []
        pos = 0
        while pos < T:
            take_from = lo + pos - int(self._starts[k])
            doc = self.documents.doc(k)
            n = min(len(doc) - take_from, T - pos)
            out.append(np.asarray(doc[take_from : take_from + n], dtype=np.int64))
            pos += n
            k += 1
        return out

    def block_tokens(self, b: int) -> Tuple[np.ndarray, np.ndarray]:
        """(ids int64 [T], fragment index int64 [T]) of block b."""
        pieces = self.fragments(b)
        frag = np.repeat(np.arange(len(pieces), dtype=np.int64), [len(p) for p in pieces])
        return np.concatenate(pieces), frag

    def __getitem__(self, b: int) -> Dict[str, torch.Tensor]:
        pieces = self.fragments(int(b))
        if not self.document_mask:
            ids = torch.from_numpy(np.concatenate(pieces))
            return {"input_ids": ids, "labels": ids.clone()}
        return pack_block([(p, p) for p in pieces], self.block_size)


def pack_documents(documents: Union[Documents, Corpus], block_size: int, document_mask: bool = True) -> PackedDataset:
    """Pack documents into blocks of `block_size` tokens (see PackedDataset)."""
    return PackedDataset(documents, block_size, document_mask)


class PackedSFTDataset(torch.utils.data.Dataset):
    """SFT: several samples per block of `block_size` tokens, with document masking.

    Samples are placed greedily in dataset order (a sample that does not fit starts a new
    block); each block is padded to block_size with `pad_id`. `dataset`: items {"input_ids",
    "labels"} [L_i] and lengths() (SFTDataset, Subset). Items: see the module docstring; with
    document masking the loss of a block is the sum of its samples' losses.
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
        samples = [self.dataset[i] for i in self.blocks[b]]
        fragments = [(np.asarray(s["input_ids"], dtype=np.int64), np.asarray(s["labels"], dtype=np.int64))
                     for s in samples]
        return pack_block(fragments, self.block_size, self.pad_id)
