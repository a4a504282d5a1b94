"""The Gaussian noise of the forward process and the samplers, drawn reproducibly per sample."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def sample_seed(seed: int, index: int) -> int:
    """An independent 63-bit seed for sample ``index`` of a run seeded with ``seed`` (numpy SeedSequence)."""
    state = np.random.SeedSequence(entropy=seed, spawn_key=(index,)).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


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
        """Generators for samples ``indices`` of a run seeded with ``seed``."""
        return cls([sample_seed(seed, i) for i in indices], device)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """z ~ N(0, I) of shape (N, *shape), row i from generator i."""
        z = torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype) for g in self.generators])
        return z.to(self.device)
