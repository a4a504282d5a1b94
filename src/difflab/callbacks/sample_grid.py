"""Sample grids during training, from the EMA weights and a fixed seed, so grids compare across steps and runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch import Tensor

from difflab.callbacks.shares import draw_share, fixed_labels, fixed_prompts, gather_shares
from difflab.images import save_grid, to_uint8
from difflab.module import DiffusionModule
from difflab.samplers import Sampler


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end, write ``<dirpath>/step_NNNNNN.png``.

    Uses the same ``DiffusionModule.generate`` as sample.py, with fixed noise; a class-conditional
    model gets fixed labels, one class per row, a text model its ``conditioning.sample_prompts``, one prompt per
    row, titled by the prompts in W&B (at ``guidance_scale``). Under DDP every rank draws
    its share of the grid at once and rank 0 saves it (:mod:`difflab.callbacks.shares`), so the
    grid is the same for any number of ranks.
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
        labels = fixed_labels(module, self.num_samples)
        num_samples = self.num_samples if labels is None else len(labels)
        images = self._draw(trainer, module, num_samples, labels)
        if not trainer.is_global_zero:
            return None
        prompts = fixed_prompts(module, self.num_samples)
        rows = labels if prompts is None else np.unique(prompts, return_inverse=True)[1]
        path = save_grid(images, self.dirpath / f"step_{step:06d}.png", scale=self.scale, labels=rows)
        titles = {} if prompts is None else {"caption": [" | ".join(dict.fromkeys(prompts))]}  # rows, top to bottom
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[str(path)], step=step, **titles)
        return path

    def _draw(self, trainer: L.Trainer, module: DiffusionModule, num_samples: int, labels: Tensor | None) -> np.ndarray:
        """All ``num_samples`` images (N, H, W, C) uint8 on every rank; each rank draws a contiguous share."""
        mine, _ = draw_share(trainer, module, self.sampler, num_samples, self.seed, labels, self.guidance_scale)
        return to_uint8(gather_shares(trainer, module, mine, num_samples))

    def on_train_batch_end(self, trainer: L.Trainer, module: DiffusionModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.write(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: DiffusionModule) -> None:
        if 0 < trainer.max_steps and trainer.global_step < trainer.max_steps:
            return  # stopped early (preempted): keep the grace period for the checkpoint
        self.write(trainer, module)
