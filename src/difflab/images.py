"""Image conversions and PNG grids in torch + PIL (torchvision does not install beside the CPU torch here)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def quantize(images: Tensor) -> Tensor:
    """Model-space images in [-1, 1], (N, C, H, W) float -> the 8-bit pixels a PNG stores, (N, C, H, W) uint8."""
    return ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def snap_to_8bit(images: Tensor) -> Tensor:
    """Images in [-1, 1] rounded to the nearest of the 256 levels k / 127.5 - 1 that a PNG holds; same dtype."""
    return (quantize(images).to(images.dtype) / 127.5 - 1).to(images.device)


def to_uint8(images: Tensor) -> np.ndarray:
    """Model-space images in [-1, 1], (N, C, H, W) float -> uint8 (N, H, W, C), guided-diffusion's convention."""
    return quantize(images.cpu()).permute(0, 2, 3, 1).numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) into one (H', W', C) image, ``nrow`` images per row (default ~sqrt N)."""
    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[top : top + h, left : left + w] = img
    return grid


def class_rows(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Reorder images (N, H, W, C) so each class fills its own row (blank cells pad short rows); returns (images, nrow)."""
    classes, counts = np.unique(labels, return_counts=True)
    nrow = int(counts.max())
    rows = np.zeros((len(classes) * nrow, *images.shape[1:]), dtype=images.dtype)
    for r, c in enumerate(classes):
        members = images[labels == c]
        rows[r * nrow : r * nrow + len(members)] = members
    return rows, nrow


def save_grid(
    images: np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 1, labels: np.ndarray | None = None
) -> Path:
    """Write uint8 images (N, H, W, C) as one PNG grid, pixels enlarged ``scale`` times; with labels, a row per class."""
    if labels is not None:
        images, nrow = class_rows(images, np.asarray(labels))
    grid = make_grid(images, nrow)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path
