"""Sample grids during training, from the EMA weights and a fixed seed, so grids compare across steps and runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from difflab.guidance import balanced_labels
from difflab.images import save_grid, to_uint8
from difflab.module import DiffusionModule
from difflab.samplers import Sampler


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end, write ``<dirpath>/step_NNNNNN.png``.

    Uses the same ``DiffusionModule.generate`` as sample.py, with fixed noise; a class-conditional
    model gets fixed labels, one class per row (at ``guidance_scale``). Under DDP every rank draws
    its share of the grid at once and rank 0 gathers and saves it: no rank waits in a collective
    while another samples (the NCCL-timeout trap of diffusers #3886), and since sample i depends on
    (seed, i) only, the grid is the same for any number of ranks.
    """

    def __init__(
        self, dirpath: str, sampler: Sampler, every_n_steps: int = 500, num_samples: int = 64,
        seed: int = 0, scale: int = 4, guidance_scale: float = 1.0,
    ) -> None:
        if every_n_steps <= 0 or num_samples <= 0:
            raise ValueError(f"every_n_steps and num_samples must be positive, got {every_n_steps}, {num_samples}")
        self.dirpath, self.sampler = Path(dirpath), sampler
        self.every_n_steps, self.num_samples, self.seed, self.scale = every_n_steps, num_samples, seed, scale
        self.guidance_scale = guidance_scale
        self.last_step = -1

    def write(self, trainer: L.Trainer, module: DiffusionModule) -> Path | None:
        step = trainer.global_step
        if step == self.last_step:
            return None
        self.last_step = step
        labels = balanced_labels(module.num_classes, self.num_samples) if module.num_classes else None
        num_samples = self.num_samples if labels is None else len(labels)
        images = self._draw(trainer, module, num_samples, labels)
        if not trainer.is_global_zero:
            return None
        path = save_grid(images, self.dirpath / f"step_{step:06d}.png", scale=self.scale, labels=labels)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[str(path)], step=step)
        return path

    def _draw(self, trainer: L.Trainer, module: DiffusionModule, num_samples: int, labels: Tensor | None) -> np.ndarray:
        """All ``num_samples`` images (N, H, W, C) uint8 on rank 0; each rank draws a contiguous share."""
        # a model trained without label dropout has no unconditional eps to guide with
        guidance_scale = self.guidance_scale if module.num_classes and module.p_uncond > 0 else 1.0
        world, share = trainer.world_size, -(-num_samples // trainer.world_size)
        lo = min(trainer.global_rank * share, num_samples)
        hi = min(lo + share, num_samples)
        mine = torch.zeros(share, *module.net.sample_shape)
        if hi > lo:
            mine[: hi - lo] = module.generate(
                self.sampler, hi - lo, self.seed, labels=None if labels is None else labels[lo:hi],
                guidance_scale=guidance_scale, first_index=lo,
            )
        if world > 1:
            mine = module.all_gather(mine.to(module.device)).reshape(world * share, *mine.shape[1:]).cpu()
        return to_uint8(mine[:num_samples])

    def on_train_batch_end(self, trainer: L.Trainer, module: DiffusionModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.write(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: DiffusionModule) -> None:
        if 0 < trainer.max_steps and trainer.global_step < trainer.max_steps:
            return  # stopped early (preempted): keep the grace period for the checkpoint
        self.write(trainer, module)
