"""A folder of the user's images, flat or one sub-folder per class (the ImageFolder layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from difflab.data.base import InMemoryDataModule
from difflab.errors import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_image(path: Path, resolution: int, channels: int) -> Tensor:
    """One image resized (shorter side) and centre-cropped to resolution^2, as (C, H, W) in [-1, 1]."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC)
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError(
            f"cannot read image {path}: {err} (every file with an image extension under dataset.path must be an "
            "image file PIL can open: remove or replace it)"
        ) from err
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).reshape(resolution, resolution, channels)
    return x.permute(2, 0, 1) / 127.5 - 1


class ImageFolderDataModule(InMemoryDataModule):
    """Images under ``path``; sub-folders of ``path`` become classes (sorted names), else one unlabeled set."""

    def __init__(self, path: str, resolution: int = 32, channels: int = 3, **kwargs) -> None:
        super().__init__(resolution=resolution, channels=channels, **kwargs)
        self.path = Path(path).expanduser() if path else None

    def files(self) -> tuple[list[Path], list[int], list[str]]:
        """Image files, their class index and the class names."""
        if self.path is None or not self.path.is_dir():
            raise ConfigError(f"dataset.path={self.path} is not a directory: set dataset.path=DIR to a folder of images")
        class_dirs = sorted(p for p in self.path.iterdir() if p.is_dir() and not p.name.startswith("."))
        top_files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if class_dirs and not top_files:
            groups = [(d.name, sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)) for d in class_dirs]
            groups = [(name, files) for name, files in groups if files]
        else:
            groups = [("", sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS))]
        files = [f for _, fs in groups for f in fs]
        if not files:
            raise ConfigError(
                f"dataset.path={self.path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        labels = [k for k, (_, fs) in enumerate(groups) for _ in fs]
        names = [name for name, _ in groups] if groups[0][0] else []
        return files, labels, names

    def load(self) -> tuple[Tensor, Tensor, list[str]]:
        files, labels, names = self.files()
        images = torch.stack([load_image(f, self.resolution, self.channels) for f in files])
        return images, torch.tensor(labels, dtype=torch.long), names
