"""CIFAR-10 and CIFAR-100 from their python-version files in a local directory (nothing is downloaded).

The files are pickles of numpy arrays; a data file the user did not write must not run code, so they
are read by :class:`ArraysOnly`, an unpickler that builds nothing but builtins and numpy arrays.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difflab.data.base import Catalog, ImageDataModule
from difflab.data.digits import resized
from difflab.data.images import Items
from difflab.errors import ConfigError

ARCHIVES = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz"),
}
"""The folder each archive of https://www.cs.toronto.edu/~kriz/cifar.html extracts to, and the archive's name."""
FILES = {
    ("cifar10", "train"): [f"data_batch_{i}" for i in range(1, 6)],
    ("cifar10", "test"): ["test_batch"],
    ("cifar100", "train"): ["train"],
    ("cifar100", "test"): ["test"],
}
META = {"cifar10": ("batches.meta", b"label_names"), "cifar100": ("meta", b"fine_label_names")}
LABELS = {"cifar10": b"labels", "cifar100": b"fine_labels"}
ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"), ("_codecs", "encode"),
}
"""The only globals a CIFAR pickle may name: numpy's array reconstruction (and latin-1 bytes under Python 3)."""


class ArraysOnly(pickle.Unpickler):
    """An unpickler of builtins and numpy arrays only: any other global is refused instead of imported."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"the file names {module}.{name}; a CIFAR file holds only numpy arrays")
        return super().find_class("numpy._core.multiarray" if module == "numpy.core.multiarray" else module, name)


def read_pickle(path: Path) -> dict[bytes, Any]:
    """A CIFAR python-version file (a Python 2 pickle: bytes keys) read with :class:`ArraysOnly`."""
    try:
        return ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ConfigError(f"{path} is not a CIFAR python-version batch file: {err}") from err


class CifarPixels(Items):
    """CIFAR images (N, 32, 32, 3) uint8, converted to (C, resolution, resolution) in [-1, 1] when fetched."""

    def __init__(self, pixels: np.ndarray, resolution: int, channels: int) -> None:
        self.pixels, self.resolution, self.channels = pixels, resolution, channels

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> Tensor:
        x = torch.from_numpy(self.pixels[indices]).permute(0, 3, 1, 2).float()
        if self.channels == 1:  # ITU-R 601-2 luma, as Pillow's convert("L")
            x = (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
        return resized(x / 127.5 - 1, self.resolution)


class CifarDataModule(ImageDataModule):
    """CIFAR-10 (``variant=cifar10``) or CIFAR-100 (``cifar100``, its 100 fine labels) from ``path``.

    ``path`` is the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or the folder holding
    it; ``split``: the ``train`` files (50,000 images), the ``test`` file (10,000), or ``all``.
    """

    def __init__(
        self, path: str, variant: str = "cifar10", split: str = "train", resolution: int = 32, channels: int = 3,
        **kwargs,
    ) -> None:
        super().__init__(resolution=resolution, channels=channels, **kwargs)
        if variant not in ARCHIVES:
            raise ConfigError(f"dataset.variant must be one of {', '.join(ARCHIVES)}, got {variant!r}")
        if split not in ("train", "test", "all"):
            raise ConfigError(f"dataset.split must be train, test or all, got {split!r}")
        self.path = Path(path).expanduser() if path else None
        self.variant, self.split_name = variant, split

    def folder(self) -> Path:
        """The folder of the batch files; refused naming the missing files and where the archive comes from."""
        folder_name, archive = ARCHIVES[self.variant]
        splits = ("train", "test") if self.split_name == "all" else (self.split_name,)
        expected = [META[self.variant][0], *(f for s in splits for f in FILES[(self.variant, s)])]
        candidates = [] if self.path is None else [self.path, self.path / folder_name]
        for folder in candidates:
            if folder.is_dir() and all((folder / f).is_file() for f in expected):
                return folder
        found = next((c for c in reversed(candidates) if c.is_dir()), None)
        missing = expected if found is None else [f for f in expected if not (found / f).is_file()]
        raise ConfigError(
            f"dataset.path={self.path} does not hold the {self.variant} python-version files: expected "
            f"{', '.join(expected)} in it or in {folder_name}/ under it; missing {', '.join(missing)}. They come from "
            f"{archive} (https://www.cs.toronto.edu/~kriz/cifar.html): `tar xzf {archive}` extracts {folder_name}/"
        )

    def catalog(self) -> Catalog:
        folder = self.folder()
        splits = ("train", "test") if self.split_name == "all" else (self.split_name,)
        batches = [read_pickle(folder / f) for s in splits for f in FILES[(self.variant, s)]]
        meta_file, names_key = META[self.variant]
        names = [n.decode() for n in read_pickle(folder / meta_file)[names_key]]
        pixels = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
        if pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
            raise ConfigError(f"{folder}: the batches hold arrays of shape {pixels.shape}, expected (N, 3072)")
        labels = torch.tensor([int(y) for b in batches for y in b[LABELS[self.variant]]], dtype=torch.long)
        pixels = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()  # rows are R, G, B planes of 32x32
        return Catalog(CifarPixels(pixels, self.resolution, self.channels), labels, names)
