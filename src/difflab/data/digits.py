"""scikit-learn's bundled handwritten digits: 1,797 gray 8x8 images, 10 classes; no download."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor

from difflab.data.base import InMemoryDataModule


def digits_tensor(resolution: int = 8) -> tuple[Tensor, Tensor]:
    """The digits as (1797, 1, resolution, resolution) floats in [-1, 1] (bilinear resize) and labels (1797,)."""
    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1, 1), torch.as_tensor(digits.target, dtype=torch.long)


class DigitsDataModule(InMemoryDataModule):
    """The digits, resized to ``resolution`` (16 by default: ~4x faster per image than 32 on CPU)."""

    def __init__(self, resolution: int = 16, channels: int = 1, **kwargs) -> None:
        super().__init__(resolution=resolution, channels=channels, **kwargs)

    def load(self) -> tuple[Tensor, Tensor, list[str]]:
        images, labels = digits_tensor(self.resolution)
        return images, labels, [str(d) for d in range(10)]
