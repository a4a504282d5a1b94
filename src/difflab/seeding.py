"""Counter-based random streams: a seed for each (run seed, stream, counters), so nothing needs saving to resume.

A stream that is a pure function of counters the checkpoint already holds (the epoch, the global
step) draws the same numbers in a resumed run as in an uninterrupted one, on every rank, with no
opaque generator state to save. numpy's ``SeedSequence`` hashes the key, so neighbouring keys give
unrelated streams.
"""

from __future__ import annotations

import random

import numpy as np
import torch

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
