"""Re-seed the global RNGs at every training micro-batch from counters, so code that draws from them resumes exactly."""

from __future__ import annotations

from typing import Any

import lightning as L

from difflab.seeding import GLOBAL, derived_seed, seed_global_rngs


class SeedEachStep(L.Callback):
    """Before each training micro-batch, seed torch (CPU, CUDA), numpy and python from (seed, step, rank, batch).

    difflab's own draws need no global RNG (the step's t, noise and label dropout come from
    ``DiffusionModule.step_generator``, the data order and flips from ``ShuffledEpochs``), but
    dropout in a UNet, a user's augmentation or any library code may draw from the global
    generators. Seeding them from counters the checkpoint restores (the global step, the batch
    index in the epoch) makes those draws the same after a resume, on every rank, with no
    generator state to save: unlike a saved state, this also holds for the other ranks of a DDP
    run, whose states a rank-0 checkpoint would not hold.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        seed_global_rngs(derived_seed(self.seed, GLOBAL, trainer.global_step, trainer.global_rank, batch_idx))
