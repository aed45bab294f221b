"""A deterministic, resumable batch loader, sharded per rank.

    loader = DataLoader(dataset, batch_size=4, seed=0)      # rank/world from torch.distributed
    for batch in loader: ...                                # one epoch; the next loop: next epoch
    state = loader.state_dict()                             # {"epoch", "batches_done", ...}
    loader.load_state_dict(state)                           # resumes with the very next batch

Order: epoch e permutes the dataset with a generator seeded by (seed, e). Rank r of W takes
every W-th index of that permutation starting at r (the tail that does not divide evenly is
dropped so every rank has the same number of samples), so the union over ranks of micro-batch
k is the same set of samples whatever the split between batch size, accumulation and world
size. group_by_length: batches of similar lengths (sorted within windows of 64 batches of the
rank's permutation, then the batch order is shuffled), deterministic too.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch

from .collate import ENDOFTEXT_ID, pad_collate

GROUP_WINDOW = 64


def _dist_rank_world() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class DataLoader:
    """Batches of `dataset` items collated by `collate_fn` (default: right padding with pad_id)."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        collate_fn: Optional[Callable[[List[Any]], Any]] = None,
        pad_id: int = ENDOFTEXT_ID,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        group_by_length: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        r, w = _dist_rank_world()
        self.rank = r if rank is None else int(rank)
        self.world_size = w if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.group_by_length = group_by_length
        self.collate_fn = collate_fn or (lambda items: pad_collate(items, pad_id=pad_id))
        self.num_samples = len(dataset)
        self.samples_per_rank = self.num_samples // self.world_size
        if self.samples_per_rank == 0:
            raise ValueError(f"dataset has {self.num_samples} items, fewer than world_size={self.world_size}")
        if drop_last and self.samples_per_rank < self.batch_size:
            raise ValueError(f"{self.samples_per_rank} items per rank, fewer than one batch of {batch_size} (drop_last)")
        self.epoch = 0
        self.batches_done = 0  # batches of the current epoch already handed out

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n = self.samples_per_rank
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_batches(self, epoch: int) -> List[np.ndarray]:
        """The index batches of `epoch` on this rank (a pure function of seed, epoch, rank)."""
        n = self.num_samples
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        mine = order[self.rank :: self.world_size][: self.samples_per_rank]
        if self.group_by_length:
            lengths = self.dataset.lengths()
            window = self.batch_size * GROUP_WINDOW
            chunks = [mine[i : i + window] for i in range(0, len(mine), window)]
            mine = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
        batches = [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.group_by_length and self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
            batches = [batches[i] for i in perm]
        return batches

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch; at its end the loader moves to the next epoch."""
        batches = self.epoch_batches(self.epoch)
        while self.batches_done < len(batches):
            idx = batches[self.batches_done]
            self.batches_done += 1
            yield self.collate_fn([self.dataset[int(i)] for i in idx])
        self.epoch += 1
        self.batches_done = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done = int(epoch), 0

    def state_dict(self) -> Dict[str, int]:
        """Where the loader is: enough to resume with the very next batch."""
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed,
                "num_samples": self.num_samples, "batch_size": self.batch_size,
                "world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resume from `state_dict()`; a state from a different dataset/batching is an error."""
        for key in ("seed", "num_samples", "batch_size", "world_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"loader state key {key!r} = {state[key]} but this loader has {getattr(self, key)}: "
                    "resuming would not give the batches of the interrupted run"
                )
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
