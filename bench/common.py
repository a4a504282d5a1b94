"""Shared benchmark helpers: the default model, the digits and a pixel-space Frechet distance."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def sampler_config(name: str, *overrides: str):
    """The sampler ``conf/sampler/<name>.yaml`` as sample.py builds it, with ``key=value`` overrides of its keys."""
    from hydra.utils import instantiate

    return instantiate(compose("sample", [f"sampler={name}", "ckpt=unused", *(f"sampler.{o}" for o in overrides)]).sampler)


def real_digits(resolution: int) -> torch.Tensor:
    """All 1,797 digits at ``resolution``, (N, 1, H, W) in [-1, 1], as the datamodule serves them."""
    from difflab.data import DigitsDataModule

    dm = DigitsDataModule(resolution=resolution, val_fraction=0.1)
    dm.setup()
    return torch.cat([dm.train_set.images, dm.val_set.images])


class DigitPixels(nn.Module):
    """Features for a Frechet distance on the digits: images area-averaged to the native 8x8, flattened (64-d)."""

    num_features = 64

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 1, H, W) in [-1, 1] -> (N, 64) float64."""
        return F.adaptive_avg_pool2d(images.double(), 8).flatten(1)


def frechet_distance(fake: torch.Tensor, real: torch.Tensor, features: nn.Module | None = None) -> float:
    """Frechet distance between two image sets (N, 1, H, W) in [-1, 1] (torchmetrics FID) in the space of
    ``features`` (a module with ``num_features``: images -> (N, num_features)); default 8x8 pixel space."""
    fid = FrechetInceptionDistance(feature=features or DigitPixels(), reset_real_features=True).double()
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


class Stamped:
    """Calls ``fn`` and records the time of every call (the step times of a sampler or training loop)."""

    def __init__(self, fn) -> None:
        self.fn, self.stamps = fn, []

    def __call__(self, *args, **kwargs):
        self.stamps.append(time.perf_counter())
        return self.fn(*args, **kwargs)

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]
