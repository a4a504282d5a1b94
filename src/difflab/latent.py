"""Latent diffusion (Rombach et al. 2022): the process runs on x0 = s E(image) of a frozen AutoencoderKL; image = D(x0 / s).

:class:`LatentSpace` wraps any diffusers-format ``AutoencoderKL`` on disk (``latent.path``): one trained by
``train_vae.py``, or a local copy of a public VAE. Its weights never enter difflab's checkpoints (a
Stable Diffusion VAE is 335 MB); the run config records the path and a fingerprint of the VAE's files,
and loading a checkpoint refuses a VAE that changed since training. The scaling factor s is decided at
the start of training and is a buffer in every checkpoint.

``scaling_factor``: ``config`` (the VAE config's ``scaling_factor``), ``estimate`` (1 / std of the latents
over the first ``scale_batches`` training batches: latent-diffusion's ``scale_by_std``), ``auto`` (the
config's when it gives those latents a std within [0.8, 1.25], so it was meant for data like this, else
the estimate), or a number.

``cache=true`` encodes every image once (``posterior``: the mean, or one sample) and trains on the stored
latents: a file under ``cache_dir`` named by a fingerprint of the VAE, the images and the options, so a
cache of another VAE or dataset is never reused.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.cache import cache_root
from difflab.checkpointing import atomic_write
from difflab.data.base import ImageDataModule
from difflab.data.images import TensorImages
from difflab.distributed import tensor_digest
from difflab.errors import ConfigError
from difflab.vae import Posterior, encode_latents, latent_shape, load_vae, vae_fingerprint

CACHE_VERSION = 1
SCALING_FACTORS = ("auto", "config", "estimate")


class LatentSpace(nn.Module):
    """A frozen AutoencoderKL between images (B, C, H, W) in [-1, 1] and scaled latents (B, c, h, w)."""

    scaling_factor: Tensor

    def __init__(
        self,
        path: str,
        image_shape: tuple[int, int, int],
        scaling_factor: str | float = "auto",
        scale_batches: int = 8,
        posterior: Posterior = "mean",
        cache: bool = False,
        cache_dir: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(scaling_factor, (int, float)) and scaling_factor > 0) and scaling_factor not in SCALING_FACTORS:
            raise ConfigError(
                f"latent.scaling_factor={scaling_factor!r} is not an option: use {', '.join(SCALING_FACTORS)} or a number > 0"
            )
        if posterior not in ("mean", "sample"):
            raise ConfigError(f"latent.posterior={posterior!r} is not an option: use mean or sample")
        if int(scale_batches) != scale_batches or scale_batches < 1:
            raise ConfigError(f"latent.scale_batches must be a positive integer, got {scale_batches}")
        self.vae = load_vae(path)  # refuses a missing or non-VAE path, naming it
        self.path, self.fingerprint = str(path), vae_fingerprint(Path(path).expanduser())
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise ConfigError(
                f"the VAE at latent.path={path} is not the one this model was trained with (its files changed: "
                f"fingerprint {self.fingerprint[:12]}, trained with {fingerprint[:12]}): restore it, or point "
                "latent.path (sample.py: vae_path=) at the original"
            )
        self.shape = latent_shape(self.vae, image_shape)
        self.image_shape = tuple(image_shape)
        self.scale_batches, self.posterior, self.cache, self.cache_dir = int(scale_batches), posterior, cache, cache_dir
        self.requested_scale = scaling_factor
        given = float(scaling_factor) if isinstance(scaling_factor, (int, float)) else math.nan
        if scaling_factor == "config":
            given = float(self.vae.config.scaling_factor)
        self.register_buffer("scaling_factor", torch.tensor(given, dtype=torch.float64))
        # The VAE is an input, like the dataset: it stays out of state dicts (checkpoints, EMA, DDP).
        self.register_state_dict_post_hook(_drop_vae_keys)
        self.register_load_state_dict_post_hook(_ignore_vae_keys)

    @property
    def scaled(self) -> bool:
        """Whether the scaling factor is decided (from config or a number, or estimated at training start)."""
        return not bool(torch.isnan(self.scaling_factor))

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z = E(x) unscaled: the posterior mean or a sample (``posterior``), no gradient; x (B, C, H, W) in [-1, 1]."""
        with torch.no_grad():
            return encode_latents(self.vae, x.to(self.vae.dtype), self.posterior, generator).to(x.dtype)

    def scale(self, z: Tensor) -> Tensor:
        """x0 = s z: the diffusion process's data."""
        return self.scaling_factor.to(z.dtype) * z

    def decode(self, x0: Tensor) -> Tensor:
        """image = D(x0 / s), clipped to [-1, 1]; x0 (B, c, h, w) -> (B, C, H, W)."""
        with torch.no_grad():
            z = (x0 / self.scaling_factor.to(x0.dtype)).to(self.vae.dtype)
            return self.vae.decode(z).sample.clamp(-1, 1).to(x0.dtype)

    def decide_scale(self, z_batches: list[Tensor]) -> str:
        """Set the scaling factor from unscaled latent batches (the first training batches); returns how it was chosen."""
        z = torch.cat([b.flatten() for b in z_batches]).double()
        estimate = 1 / float(z.std())
        config = float(self.vae.config.scaling_factor)
        if self.requested_scale == "auto" and 0.8 <= config * float(z.std()) <= 1.25:
            factor, how = config, f"from the VAE config (latent std {config * float(z.std()):.3f} with it)"
        elif self.requested_scale in ("auto", "estimate"):
            factor, how = estimate, f"estimated as 1/std over {len(z_batches)} batches ({z.numel()} values)"
            if self.requested_scale == "auto":
                how += f"; the config's {config:g} would give std {config * float(z.std()):.3g}"
        else:
            return f"given: {float(self.scaling_factor):g}"
        self.scaling_factor.fill_(factor)
        return how

    def summary(self) -> dict[str, Any]:
        """What a run records about its latent space (``<run dir>/latent.json``)."""
        return {"path": self.path, "fingerprint": self.fingerprint, "scaling_factor": float(self.scaling_factor),
                "latent_shape": list(self.shape), "image_shape": list(self.image_shape), "posterior": self.posterior}


def _drop_vae_keys(module: LatentSpace, state_dict: dict[str, Tensor], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "vae.")]:
        del state_dict[key]


def _ignore_vae_keys(module: LatentSpace, incompatible_keys: Any) -> None:
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if ".vae." not in f".{k}"]


def use_stored_latents(latent: LatentSpace | None, stored: dict[str, Any]) -> None:
    """Train ``latent`` on latents a source stores (``stored``: their VAE's fingerprint and posterior): the encoder
    stays out of the loop; refused unless they are latents of this VAE, drawn as ``latent.posterior`` draws."""
    if latent is None:
        raise ConfigError("the dataset serves VAE latents (dataset.latents=true): train with latent=vae "
                          f"latent.path={stored['path']} (their VAE), or set dataset.latents=false for the images")
    if stored["fingerprint"] != latent.fingerprint or stored["posterior"] != latent.posterior:
        raise ConfigError(
            f"the dataset's latents are of the VAE {stored['path']} (fingerprint {stored['fingerprint'][:12]}, "
            f"posterior {stored['posterior']}), not of latent.path={latent.path} ({latent.fingerprint[:12]}, "
            f"posterior {latent.posterior}): write the shards with this VAE, or point latent.path at theirs"
        )
    latent.cache = True  # batches are unscaled latents z, as from the cache


def cached_latents(
    datamodule: ImageDataModule, latent: LatentSpace, seed: int = 0
) -> tuple[Path, TensorImages, TensorImages]:
    """The unscaled latents of ``datamodule``'s training and validation images from a cache file (encoding once):
    (the file, train latents, val latents), for :meth:`~difflab.data.base.ImageDataModule.serve_latents`.

    The file is named by a fingerprint of the VAE, the images of both splits, the posterior mode and the
    seed of its samples, and it stores that manifest: a file that does not match is rebuilt. With hflip, the
    flipped images are encoded too and a flip picks their latents (a flipped latent is not the latent of the
    flipped image).
    """
    datamodule.setup("fit")
    train, val = datamodule.train_set, datamodule.val_set
    manifest = {
        "version": CACHE_VERSION, "vae": latent.fingerprint, "posterior": latent.posterior, "seed": seed,
        "hflip": bool(train.hflip), "train": tensor_digest([train.images]), "val": tensor_digest([val.images]),
    }
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(latent.cache_dir).expanduser() if latent.cache_dir else cache_root() / "latents"
    path = path / f"{key}.pt"
    stored = _read_cache(path)
    if stored is None or stored["manifest"] != manifest:
        generator = torch.Generator().manual_seed(seed)
        encode = lambda images: torch.cat([latent.encode(b, generator) for b in images.split(256)])  # noqa: E731
        stored = {"manifest": manifest, "train": encode(train.images), "val": encode(val.images)}
        if train.hflip:
            stored["train_flipped"] = encode(train.images.flip(-1))
        atomic_write(path, lambda f: torch.save(stored, f))
    return (
        path,
        TensorImages(stored["train"], train.labels, train.hflip, stored.get("train_flipped")),
        TensorImages(stored["val"], val.labels),
    )


def _read_cache(path: Path) -> dict[str, Any] | None:
    """A cache file's contents (weights_only), or None if it is missing or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a truncated or foreign file is rebuilt, never trusted
        return None
