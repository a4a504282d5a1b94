"""Counter-based random streams: a seed for each (run seed, stream, counters), so nothing needs saving to resume.

Every seeded draw of difflab comes from here: a sample's noise from (seed, sample index) through
:class:`PerSampleNoise`, a training step's from (seed, step, rank, micro-batch), the data order from
(seed, DATA, epoch), the global RNGs from (seed, GLOBAL, step, rank, batch).

A stream that is a pure function of counters the checkpoint already holds (the epoch, the global
step) draws the same numbers in a resumed run as in an uninterrupted one, on every rank, with no
opaque generator state to save. numpy's ``SeedSequence`` hashes the key, so neighbouring keys give
unrelated streams.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

DATA = 0x64617461
"""Stream tag of the training data's order and augmentations ('data')."""
GLOBAL = 0x726E6773
"""Stream tag of the global RNGs (torch, CUDA, numpy, python) re-seeded at every training micro-batch ('rngs')."""


def derived_seed(seed: int, *key: int) -> int:
    """A 63-bit seed that depends on (``seed``, ``key``) only."""
    state = np.random.SeedSequence(entropy=seed, spawn_key=key).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def derived_generator(seed: int, *key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded by :func:`derived_seed`."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, *key))


def seed_global_rngs(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch's (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class PerSampleNoise:
    """One torch generator per sample, so a sample's noise depends on its seed alone, not on the batch.

    As in EDM's StackedRandomGenerator. Noise is drawn on the CPU and moved to ``device``, so the
    same seed gives the same images on CPU and GPU.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = torch.device(device)

    @classmethod
    def for_indices(cls, seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> PerSampleNoise:
        """Generators for samples ``indices`` of a run seeded with ``seed``: sample i's seed is derived_seed(seed, i)."""
        return cls([derived_seed(seed, i) for i in indices], device)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """z ~ N(0, I) of shape (N, *shape), row i from generator i."""
        z = torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype) for g in self.generators])
        return z.to(self.device)
