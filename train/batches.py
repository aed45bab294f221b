"""The loop's view of data/'s loader: one micro-batch of example indices at a time.

    sampler = MicroBatchSampler(dataset, batch_size=4, seed=0)
    idx = sampler.next_batch()          # indices of the next micro-batch; epochs roll over
    state = sampler.state_dict()        # data.DataLoader's state: {"epoch", "batches_done", ...}

The order is data.DataLoader's (epoch e permutes with a generator seeded by (seed, e), one
shard per rank), so it depends on nothing but (seed, epoch, position): restoring the state
reproduces the remaining micro-batches exactly. The loop pulls micro-batches one by one
because an optimizer step's grad_accum micro-batches may straddle an epoch boundary.
"""

from __future__ import annotations

from typing import Any, Sequence

from data import DataLoader

IGNORE_INDEX = -100


class MicroBatchSampler:
    """Index batches of data.DataLoader(dataset, batch_size, seed, shuffle), drawn one at a time."""

    def __init__(self, dataset: Sequence, batch_size: int, seed: int = 0, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty: nothing to sample")
        self.loader = DataLoader(dataset, batch_size=batch_size, seed=seed, shuffle=shuffle, collate_fn=list)
        self._cache: tuple[int, list] = (-1, [])

    @property
    def batches_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def next_batch(self) -> list[int]:
        loader = self.loader
        if self._cache[0] != loader.epoch:
            self._cache = (loader.epoch, loader.epoch_batches(loader.epoch))
        batches = self._cache[1]
        idx = [int(i) for i in batches[loader.batches_done]]
        loader.batches_done += 1
        if loader.batches_done >= len(batches):
            loader.epoch, loader.batches_done = loader.epoch + 1, 0
        return idx

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
