"""The loop's view of data/'s loader: one micro-batch of example indices at a time.

    sampler = MicroBatchSampler(dataset, batch_size=4, seed=0, rank=0, world_size=1)
    idx = sampler.next_batch()          # this rank's indices of the next micro-batch
    state = sampler.state_dict()        # {"epoch", "position", "seed", "num_samples", ...}

The samples form one global stream: epoch e is data.DataLoader's permutation of the dataset
(a generator seeded by (seed, e)), and the epochs follow each other. Micro-batch k of the run
is the next batch_size x world_size samples of the stream, and rank r of W takes every W-th
of them starting at r (data.DataLoader's interleaving), so:

- the samples of an optimizer step (grad_accum micro-batches on every rank) are the same set
  for every split of the global batch batch_size x grad_accum x world_size;
- a micro-batch that reaches the end of an epoch continues with the next one: every
  micro-batch is full and no sample is dropped, whatever the world size;
- the state is (epoch, samples of it consumed): a pure position in the stream, independent
  of the split, so a checkpoint resumes under any world size that divides the global batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from data import DataLoader


class MicroBatchSampler:
    """This rank's share of successive micro-batches of the global sample stream."""

    def __init__(self, dataset: Sequence, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty: nothing to sample")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        # One batch of the whole dataset per epoch: DataLoader's permutation, unsharded.
        self.loader = DataLoader(dataset, batch_size=len(dataset), seed=seed, shuffle=shuffle, collate_fn=list,
                                 rank=0, world_size=1)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.epoch = 0
        self.position = 0          # samples of the current epoch already taken (by all ranks)
        self._cache: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))

    @property
    def samples_per_epoch(self) -> int:
        return self.loader.num_samples

    def _order(self, epoch: int) -> np.ndarray:
        if self._cache[0] != epoch:
            self._cache = (epoch, self.loader.epoch_batches(epoch)[0])
        return self._cache[1]

    def next_batch(self) -> list[int]:
        """This rank's batch_size indices of the next global micro-batch."""
        want = self.batch_size * self.world_size
        taken: list[int] = []
        while len(taken) < want:
            order = self._order(self.epoch)
            stop = min(len(order), self.position + want - len(taken))
            taken.extend(int(i) for i in order[self.position : stop])
            self.position = stop
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return taken[self.rank :: self.world_size]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.loader.seed,
                "num_samples": self.loader.num_samples, "shuffle": self.loader.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`; a state of another dataset or seed is an error."""
        for key in ("seed", "num_samples", "shuffle"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(f"sampler state {key!r} = {state[key]!r} but this run has {self.state_dict()[key]!r}: "
                                 "resuming would not give the batches of the interrupted run")
        epoch = int(state["epoch"])
        if "position" in state:
            position = int(state["position"])
        else:   # a state of data.DataLoader (checkpoints written before the global stream, one process)
            position = int(state["batches_done"]) * int(state["batch_size"])
        if epoch < 0 or not 0 <= position < self.samples_per_epoch:
            raise ValueError(f"epoch {epoch}, position {position}: outside the data (an epoch holds "
                             f"{self.samples_per_epoch} samples)")
        self.epoch, self.position = epoch, position
