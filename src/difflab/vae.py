"""Stage 1 of latent diffusion (Rombach et al. 2022): a KL-regularised autoencoder, and what stage 2 needs of it.

The network is ``diffusers.AutoencoderKL``: an encoder E giving q(z | x) = N(mu(x), diag sigma^2(x)),
a decoder D with x_hat = D(z). Stage 2 diffuses z * scaling_factor with the VAE frozen.

| name in code | symbol |
|---|---|
| ``posterior.mean``, ``posterior.std`` | mu(x), sigma(x) of q(z \\| x) (diffusers' DiagonalGaussianDistribution) |
| ``scaling_factor`` | 1 / std(z) over training latents (LDM's ``scale_by_std``, their section 4.3.2 and appendix D.1) |
| ``kl_weight`` | weight of KL(q(z \\| x) \\|\\| N(0, I)) per latent element against the per-pixel reconstruction loss |
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor

from difflab.denoiser import downsampling_factor
from difflab.ema import EMA
from difflab.errors import ConfigError

Posterior = Literal["sample", "mean"]
REC_LOSSES = ("l1", "l2")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def kl_per_element(posterior: DiagonalGaussianDistribution) -> Tensor:
    """KL(q(z|x) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2), as a mean over batch and latent elements."""
    return posterior.kl().mean() / posterior.mean[0].numel()


def reconstruction_loss(x_hat: Tensor, x: Tensor, kind: str) -> Tensor:
    """|x - x_hat| (``l1``) or (x - x_hat)^2 (``l2``), averaged over all elements; x, x_hat (B, C, H, W)."""
    return F.l1_loss(x_hat, x) if kind == "l1" else F.mse_loss(x_hat, x)


class VAEModule(L.LightningModule):
    """Trains an AutoencoderKL with L = rec(x, D(z)) + kl_weight * KL(q(z|x) || N(0, I)), z ~ q(z|x); AdamW.

    Both terms are means per element: rec over the B*C*H*W pixels, the KL over the B*c*h*w latent
    elements. So ``kl_weight`` prices one nat of KL per latent element in units of per-pixel
    reconstruction error, whatever the image and latent sizes. (latent-diffusion sums both per
    image instead; its weight w corresponds to w * c*h*w / (C*H*W) here, its 1e-6 for Stable
    Diffusion's f = 8, c = 4 RGB VAE to ~2e-8.)

    With ``ema_decay`` set, an EMA of the weights (``difflab.ema.EMA``) follows every optimizer step,
    and :attr:`export_vae` (what is saved and what reconstruction grids show) is the EMA copy.
    Validation reconstructs the held-out split from the posterior mean z = mu(x) and logs
    ``val/rec_mse``, ``val/rec_l1`` and ``val/kl`` (with ``_ema`` for the EMA weights).
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        rec_loss: str = "l1",
        kl_weight: float = 1e-3,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        adam_betas: Sequence[float] = (0.9, 0.999),
        ema_decay: float | None = None,
        ema_warmup: bool = True,
    ) -> None:
        super().__init__()
        if rec_loss not in REC_LOSSES:
            raise ValueError(f"autoencoder.rec_loss={rec_loss} is not an option: use one of {', '.join(REC_LOSSES)}")
        if kl_weight < 0:
            raise ValueError(f"autoencoder.kl_weight must be >= 0, got {kl_weight}")
        self.vae = vae
        self.ema = None if ema_decay is None else EMA(vae, decay=ema_decay, warmup=ema_warmup)
        self.rec_loss, self.kl_weight = rec_loss, kl_weight
        self.lr, self.weight_decay, self.adam_betas = lr, weight_decay, tuple(adam_betas)

    @property
    def export_vae(self) -> AutoencoderKL:
        """The weights a user gets: the EMA copy when EMA is on, else the trained ones."""
        return self.vae if self.ema is None else self.ema.module

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x = batch[0]
        posterior = self.vae.encode(x).latent_dist
        rec = reconstruction_loss(self.vae.decode(posterior.sample()).sample, x, self.rec_loss)
        kl = kl_per_element(posterior)
        loss = rec + self.kl_weight * kl
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/rec", rec)
        self.log("train/kl", kl)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # as in DiffusionModule: the EMA follows each step before any callback, so a checkpoint at step k holds EMA k
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.vae)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x = batch[0]
        nets = [("", self.vae)] + ([("_ema", self.ema.module)] if self.ema is not None else [])
        for suffix, vae in nets:  # the progress bar shows the exported weights' error
            posterior = vae.encode(x).latent_dist
            x_hat = vae.decode(posterior.mean).sample
            self.log(f"val/rec_mse{suffix}", F.mse_loss(x_hat, x), sync_dist=True, prog_bar=vae is self.export_vae)
            self.log(f"val/rec_l1{suffix}", F.l1_loss(x_hat, x), sync_dist=True)
            self.log(f"val/kl{suffix}", kl_per_element(posterior), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.vae.parameters(), lr=self.lr, weight_decay=self.weight_decay, betas=self.adam_betas
        )


def latent_shape(vae: AutoencoderKL, image_shape: Sequence[int]) -> tuple[int, int, int]:
    """(c, h, w) of the latents of images of shape (C, H, W); ConfigError if the VAE cannot take such images."""
    channels, height, width = image_shape
    if vae.config.in_channels != channels:
        raise ConfigError(
            f"the VAE takes {vae.config.in_channels}-channel images but the dataset's have {channels} channels: "
            f"use a VAE trained on {channels}-channel data (dataset.channels)"
        )
    factor = downsampling_factor(vae)  # the encoder halves the size in every block but the last, as the UNet does
    if height % factor or width % factor:
        raise ConfigError(
            f"image size {height}x{width} is not divisible by the VAE's downsampling factor {factor} "
            f"({len(vae.config.block_out_channels)} blocks): use a dataset.resolution that is a multiple of {factor}"
        )
    return vae.config.latent_channels, height // factor, width // factor


def encode_latents(
    vae: AutoencoderKL, x: Tensor, posterior: Posterior = "sample", generator: torch.Generator | None = None
) -> Tensor:
    """z = mu(x) (``mean``) or z ~ q(z|x) (``sample``), unscaled; x (B, C, H, W) in [-1, 1] -> z (B, c, h, w)."""
    dist = vae.encode(x).latent_dist
    return dist.mean if posterior == "mean" else dist.sample(generator)


@torch.no_grad()
def estimate_scaling_factor(
    vae: AutoencoderKL, batches: Iterable[Tensor], posterior: Posterior = "sample", seed: int = 0
) -> float:
    """1 / std(z) over all elements of the latents of ``batches`` (each (B, C, H, W)): LDM's ``scale_by_std``.

    By default z is a posterior sample, as in latent-diffusion (whose ``get_first_stage_encoding``
    samples): a diffusion model trained on fresh encodings sees samples, so this makes its data
    unit-variance. Var(sample) = Var(mu) + E[sigma^2]: for the trained default digits VAE sigma is
    small against the spread of mu and the ``mean`` estimate is 0.16% larger (docs/benchmarks.md);
    early in training, while sigma is large, the two differ more. Pass ``posterior="mean"`` for
    latents cached as means. The sample draws from a generator seeded with
    ``seed``: the result is reproducible and the global RNG is not touched. The std is centred
    (torch.std, as latent-diffusion); the mean is not removed from the latents, matching how
    ``scaling_factor`` is applied (z * scaling_factor).
    """
    was_training = vae.training
    vae.eval()
    generator, total, total_sq, count = None, 0.0, 0.0, 0
    for x in batches:
        x = x.to(vae.device, vae.dtype)
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(seed)
        z = encode_latents(vae, x, posterior, generator).double()
        total, total_sq, count = total + z.sum().item(), total_sq + z.square().sum().item(), count + z.numel()
    vae.train(was_training)
    if count < 2:
        raise ValueError("estimate_scaling_factor needs at least one non-empty batch of images")
    var = (total_sq - total * total / count) / (count - 1)
    return float(var**-0.5)


def save_vae(vae: AutoencoderKL, path: str | os.PathLike, scaling_factor: float | None = None) -> Path:
    """Write ``vae`` in diffusers' format (config.json + safetensors) to ``path``, replacing it whole.

    ``scaling_factor`` (if given) goes into the VAE's config first. The files are written to a
    temporary dir beside ``path`` that is then renamed into place, so ``path`` never holds a
    half-written VAE: a reader finds the previous VAE, the new one, or (for an instant) none.
    """
    path = Path(path)
    if scaling_factor is not None:
        vae.register_to_config(scaling_factor=float(scaling_factor))
    tmp, old = path.with_name(f".{path.name}.tmp-{os.getpid()}"), path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        vae.save_pretrained(tmp, safe_serialization=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


EXPECTED = (
    "expected a directory holding a diffusers AutoencoderKL (config.json with _class_name AutoencoderKL, and its "
    "weights, as save_pretrained writes), e.g. outputs/vae/latest/vae from train_vae.py"
)


def load_vae(path: str | os.PathLike) -> AutoencoderKL:
    """A diffusers AutoencoderKL from a local dir (no download), frozen and in eval mode; ConfigError if it is none."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"VAE path {path} does not exist: {EXPECTED}")
    config_file = path / "config.json"
    if not config_file.is_file():
        hint = ""
        if (path / "model_index.json").is_file() and (path / "vae" / "config.json").is_file():
            hint = f" ({path} is a pipeline: its VAE is {path / 'vae'})"
        what = "is not a directory" if not path.is_dir() else "has no config.json"
        raise ConfigError(f"VAE path {path} {what}{hint}: {EXPECTED}")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ConfigError(f"VAE path {path}: config.json is not a diffusers config ({err}): {EXPECTED}") from err
    if class_name != AutoencoderKL.__name__:
        raise ConfigError(
            f"VAE path {path} holds a {class_name} (config.json _class_name), not an AutoencoderKL: {EXPECTED}"
        )
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"cannot load the AutoencoderKL in {path}: {err}") from err
    return vae.requires_grad_(False).eval()


def vae_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over a saved VAE's config.json and weight files (names and bytes): changes whenever the VAE does."""
    path = Path(path)
    files = [path / "config.json"] + sorted(
        p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json")
    )
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
