"""Save the autoencoder in diffusers' format, with its latent scaling factor, for stage 2 (``latent.path=``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

from difflab.vae import Posterior, VAEModule, estimate_scaling_factor, save_vae

log = logging.getLogger(__name__)


class SaveVAE(L.Callback):
    """Write :attr:`VAEModule.export_vae` (EMA weights when EMA is on) to ``dirpath`` whenever a checkpoint is
    written and at the end of training, on rank 0 only.

    Before each save, ``scaling_factor`` = 1 / std(z) is estimated (:func:`difflab.vae.estimate_scaling_factor`)
    over the first ``scale_images`` training images in order (``posterior``: a sample, as latent-diffusion,
    or the mean; fixed ``seed``) and written into the VAE's config. :func:`difflab.vae.save_vae` writes
    through a temporary dir, so ``dirpath`` always holds a whole VAE.
    """

    def __init__(
        self,
        dirpath: str,
        scale_images: int = 512,
        batch_size: int = 128,
        posterior: Posterior = "sample",
        seed: int = 0,
    ) -> None:
        if posterior not in ("sample", "mean"):
            raise ValueError(f"posterior={posterior} is not an option: use sample or mean")
        if scale_images <= 0 or batch_size <= 0:
            raise ValueError(f"scale_images and batch_size must be positive, got {scale_images}, {batch_size}")
        self.dirpath, self.scale_images, self.batch_size = Path(dirpath), scale_images, batch_size
        self.posterior, self.seed = posterior, seed
        self.last_step = -1
        self.scaling_factor: float | None = None

    def save(self, trainer: L.Trainer, module: VAEModule) -> Path | None:
        step = trainer.global_step
        if step == self.last_step or not trainer.is_global_zero:
            return None
        self.last_step = step
        images = trainer.datamodule.train_set.head(self.scale_images)
        vae = module.export_vae
        self.scaling_factor = estimate_scaling_factor(vae, images.split(self.batch_size), self.posterior, self.seed)
        path = save_vae(vae, self.dirpath, self.scaling_factor)
        log.info("saved the VAE of step %d to %s (scaling_factor %.4f)", step, path, self.scaling_factor)
        return path

    def on_save_checkpoint(self, trainer: L.Trainer, module: VAEModule, checkpoint: dict[str, Any]) -> None:
        self.save(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: VAEModule) -> None:
        self.save(trainer, module)
