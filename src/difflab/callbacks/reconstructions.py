"""Reconstruction grids of the autoencoder during training: fixed held-out images beside their reconstructions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from difflab.images import save_grid, to_uint8
from difflab.vae import VAEModule


class Reconstructions(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end, write ``<dirpath>/step_NNNNNN.png``.

    The first ``num_images`` images of the validation split (the training split if there is none),
    each followed by its reconstruction D(mu(x)) from :attr:`VAEModule.export_vae` (the EMA weights
    when EMA is on): ``pairs_per_row`` original/reconstruction pairs per row. Drawn on rank 0 only
    (no collective: the other ranks go on). Logged to every logger with ``log_image``.
    """

    def __init__(
        self, dirpath: str, every_n_steps: int = 200, num_images: int = 32, pairs_per_row: int = 8, scale: int = 4
    ) -> None:
        if every_n_steps <= 0 or num_images <= 0 or pairs_per_row <= 0:
            raise ValueError(
                f"every_n_steps, num_images and pairs_per_row must be positive, got {every_n_steps}, {num_images}, "
                f"{pairs_per_row}"
            )
        self.dirpath, self.every_n_steps, self.num_images = Path(dirpath), every_n_steps, num_images
        self.pairs_per_row, self.scale = pairs_per_row, scale
        self.last_step = -1

    @torch.no_grad()
    def write(self, trainer: L.Trainer, module: VAEModule) -> Path | None:
        step = trainer.global_step
        if step == self.last_step or not trainer.is_global_zero:
            return None
        self.last_step = step
        data = trainer.datamodule
        images = (data.val_set if len(data.val_set) else data.train_set).head(self.num_images)
        vae = module.export_vae
        was_training = vae.training
        vae.eval()
        x = images.to(module.device, vae.dtype)
        x_hat = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        vae.train(was_training)
        pairs = torch.stack([x, x_hat], dim=1).flatten(0, 1)  # original, reconstruction, original, ...
        path = save_grid(
            to_uint8(pairs), self.dirpath / f"step_{step:06d}.png", nrow=2 * self.pairs_per_row, scale=self.scale
        )
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="reconstructions", images=[str(path)], step=step)
        return path

    def on_train_batch_end(self, trainer: L.Trainer, module: VAEModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.write(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: VAEModule) -> None:
        self.write(trainer, module)
