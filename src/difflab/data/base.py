"""In-memory image DataModules: the whole dataset is one tensor, batches are index slices.

Measured on 2 cores (../shared/NOTES.md): DataLoader workers cost 10-30x more per batch than
indexing a tensor in the main process, so batches are fetched whole through ``__getitems__``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from difflab.distributed import device_batch_size
from difflab.errors import ConfigError


SPLITS = ("train", "val", "all")
"""The image sets of a DataModule: its training split, its held-out validation split, or both."""


def _batch_as_is(batch: Any) -> Any:
    return batch


def training_batches(datamodule: L.LightningDataModule, batch_size: int = 256) -> list[Tensor]:
    """Every training image once, augmented as in training, in batches (B, C, H, W): the stream a model sees.

    Unlike one epoch of the training loader, no image is dropped to fill the last batch.
    """
    datamodule.setup("fit")
    loader = DataLoader(datamodule.train_source, batch_size=batch_size, collate_fn=_batch_as_is)
    return [batch[0] for batch in loader]


class TensorImages(Dataset):
    """Images (N, C, H, W) in [-1, 1] with labels (N,); fetches a whole batch per call, optionally flipped.

    ``flipped`` (N, ...), when given, is what a flip serves instead of the mirrored item (cached latents of
    the mirrored images: a mirrored latent is not the latent of the mirrored image).
    """

    def __init__(self, images: Tensor, labels: Tensor, hflip: bool = False, flipped: Tensor | None = None) -> None:
        self.images, self.labels, self.hflip, self.flipped = images, labels, hflip, flipped

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices)
        x = self.images[idx]
        if self.hflip:
            flip = torch.rand(len(idx)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1) if self.flipped is None else self.flipped[idx], x)
        return x, self.labels[idx]


class InMemoryDataModule(L.LightningDataModule):
    """Loads (images, labels, class names) once, splits off a fixed validation set, serves tensor batches.

    ``batch_size`` is the global batch: images per optimizer step, summed over all processes and
    accumulated micro-batches. :meth:`split_batch` divides it among them before a fit, so changing
    the number of GPUs or the accumulation leaves the experiment (and every cadence counted in
    optimizer steps) unchanged.
    """

    def __init__(
        self, resolution: int, channels: int, batch_size: int = 64, val_fraction: float = 0.1,
        hflip: bool = False, split_seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ConfigError(f"dataset.batch_size must be a positive integer, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"dataset.val_fraction must lie in [0, 1), got {val_fraction}")
        if channels not in (1, 3):
            raise ConfigError(f"dataset.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.resolution, self.channels = resolution, channels
        self.batch_size, self.val_fraction, self.hflip, self.split_seed = batch_size, val_fraction, hflip, split_seed
        self.device_batch_size = batch_size
        self.train_set: TensorImages | None = None
        self.val_set: TensorImages | None = None
        self.encoded: tuple[TensorImages, TensorImages] | None = None
        """(train, val) latents the loaders serve instead of the images (``latent.cache``), or None."""
        self.class_names: list[str] = []

    def split_batch(self, world_size: int, accumulate_grad_batches: int = 1) -> int:
        """Set and return the per-process micro-batch: batch_size / (world_size * accumulate_grad_batches)."""
        self.device_batch_size = device_batch_size(self.batch_size, world_size, accumulate_grad_batches)
        return self.device_batch_size

    def load(self) -> tuple[Tensor, Tensor, list[str]]:
        """All images (N, channels, resolution, resolution) in [-1, 1], labels (N,) long, class names."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels, self.class_names = self.load()
        expected = (self.channels, self.resolution, self.resolution)
        if tuple(images.shape[1:]) != expected:
            raise ConfigError(f"dataset gives images of shape {tuple(images.shape[1:])}, expected {expected}")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(round(self.val_fraction * len(images)))
        val, train = order[:n_val], order[n_val:]
        if len(train) < self.batch_size:
            raise ConfigError(
                f"the training split has {len(train)} images, fewer than dataset.batch_size={self.batch_size}"
            )
        self.train_set = TensorImages(images[train], labels[train], self.hflip)
        self.val_set = TensorImages(images[val], labels[val])

    @property
    def train_source(self) -> TensorImages:
        """What training reads: the training images, or their cached latents."""
        return self.train_set if self.encoded is None else self.encoded[0]

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """(images (M, C, H, W) in [-1, 1], labels (M,)) of the ``train``, ``val`` or ``all`` split, un-augmented."""
        if name not in SPLITS:
            raise ConfigError(f"split={name!r} is not one of {', '.join(SPLITS)}")
        self.setup("fit")
        parts = {"train": [self.train_set], "val": [self.val_set], "all": [self.train_set, self.val_set]}[name]
        return torch.cat([part.images for part in parts]), torch.cat([part.labels for part in parts])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_source, batch_size=self.device_batch_size, shuffle=True, drop_last=True, collate_fn=_batch_as_is
        )

    def val_dataloader(self) -> DataLoader:
        val = self.val_set if self.encoded is None else self.encoded[1]
        return DataLoader(val, batch_size=self.device_batch_size, collate_fn=_batch_as_is)
