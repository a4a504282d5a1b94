"""The training stream's order: epoch e's items are a function of (seed, e); the position in it is checkpointed.

Epoch e's order and every augmentation coin are functions of (seed, e) alone (:class:`ShuffledEpochs`),
and the loader's position within the epoch travels in the checkpoint (:class:`ResumableLoader`), so a
run resumed mid-epoch sees the same batches as an uninterrupted one, with or without DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from difflab.seeding import DATA, derived_generator


class ShuffledEpochs(DistributedSampler):
    """This rank's (index, item seed) items of epoch e, both drawn from a generator seeded by (seed, e) alone.

    Epoch e is one permutation of the N items and one 62-bit seed per position; rank r of W takes
    positions r, r + W, ... (the tail that does not divide by W is dropped), so the images of an
    optimizer step are the same for any number of ranks. A ``DistributedSampler``, so Lightning
    sets its epoch and does not replace it under DDP.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0
        """Items of this rank to leave out at the start of the next pass (a resumed epoch); reset by the pass."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = derived_generator(self.seed, DATA, self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        seeds = torch.randint(0, 2**62, (len(self.dataset),), generator=generator).tolist()
        positions = range(self.rank, self.total_size, self.num_replicas)[self.skip :]
        self.skip = 0
        for p in positions:
            yield order[p], seeds[p]


class ResumableLoader(DataLoader):
    """A DataLoader over :class:`ShuffledEpochs` whose ``state_dict`` is (epoch, batches served in it).

    Lightning saves the state of a loader that has ``state_dict`` / ``load_state_dict`` in every
    checkpoint and hands it back before a resumed fit's first batch (its loops restore their own
    position within the epoch); a plain DataLoader would start the epoch's data over. Batches are
    counted as they leave the loader, so worker prefetching does not shift the count.
    """

    sampler: ShuffledEpochs

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ShuffledEpochs, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self._served = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: this body runs at the first batch, after Lightning has set the sampler's epoch.
        if self._resume is not None and self._resume[0] == self.sampler.epoch:
            self._served = self._resume[1]
        else:  # a new epoch (also when the checkpoint was written at the end of the previous one)
            self._served = 0
        self._resume = None
        self.sampler.skip = self._served * self.batch_size
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))
