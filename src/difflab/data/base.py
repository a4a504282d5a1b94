"""In-memory image DataModules: the whole dataset is one tensor, batches are index slices.

Measured on 2 cores: DataLoader workers cost 10-30x more per batch than
indexing a tensor in the main process, so batches are fetched whole through ``__getitems__``.

The training stream is resumable: epoch e's order and every augmentation coin are functions of
(seed, e) alone (:class:`ShuffledEpochs`), and the loader's position within the epoch travels in
the checkpoint (:class:`ResumableLoader`), so a run resumed mid-epoch sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from difflab.distributed import device_batch_size
from difflab.errors import ConfigError
from difflab.seeding import DATA, derived_generator

SPLITS = ("train", "val", "all")
"""The image sets of a DataModule: its training split, its held-out validation split, or both."""


def _batch_as_is(batch: Any) -> Any:
    return batch


Item = int | tuple[int, int]
"""A dataset index, or (index, item seed) as :class:`ShuffledEpochs` draws them."""


def training_batches(datamodule: InMemoryDataModule, batch_size: int = 256) -> list[Tensor]:
    """Every training image once, flipped as in training, in batches (B, C, H, W): the stream a model sees.

    Unlike one epoch of the training loader, no image is dropped to fill the last batch; each image's
    flip comes from an item seed of epoch 0's generator, so the batches are a function of the seed alone.
    """
    datamodule.setup("fit")
    source = datamodule.train_source
    generator = derived_generator(datamodule.seed, DATA, 0)
    items = list(zip(range(len(source)), torch.randint(0, 2**62, (len(source),), generator=generator).tolist()))
    loader = DataLoader(source, batch_size=batch_size, sampler=items, collate_fn=_batch_as_is)
    return [batch[0] for batch in loader]


class TensorImages(Dataset):
    """Images (N, C, H, W) in [-1, 1] with labels (N,); fetches a whole batch per call, optionally flipped.

    An item is an index, or an (index, item seed) pair whose seed decides the item's augmentation
    (the lowest bit: a horizontal flip), so augmentations are drawn by the sampler from counters,
    never from the global RNG or a worker's. ``flipped`` (N, ...), when given, is what a flip serves
    instead of the mirrored item (cached latents of the mirrored images: a mirrored latent is not the
    latent of the mirrored image).
    """

    def __init__(self, images: Tensor, labels: Tensor, hflip: bool = False, flipped: Tensor | None = None) -> None:
        self.images, self.labels, self.hflip, self.flipped = images, labels, hflip, flipped

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, item: Item) -> tuple[Tensor, Tensor]:
        return self.__getitems__([item])

    def __getitems__(self, items: list[Item]) -> tuple[Tensor, Tensor]:
        pairs = [item if isinstance(item, tuple) else (item, 0) for item in items]
        idx, seeds = torch.as_tensor(pairs).unbind(1)
        x = self.images[idx]
        if self.hflip:
            mirrored = x.flip(-1) if self.flipped is None else self.flipped[idx]
            x = torch.where((seeds & 1).bool()[:, None, None, None], mirrored, x)
        return x, self.labels[idx]


class ShuffledEpochs(DistributedSampler):
    """This rank's (index, item seed) items of epoch e, both drawn from a generator seeded by (seed, e) alone.

    Epoch e is one permutation of the N items and one 62-bit seed per position; rank r of W takes
    positions r, r + W, ... (the tail that does not divide by W is dropped), so the images of an
    optimizer step are the same for any number of ranks. A ``DistributedSampler``, so Lightning
    sets its epoch and does not replace it under DDP.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0
        """Items of this rank to leave out at the start of the next pass (a resumed epoch); reset by the pass."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = derived_generator(self.seed, DATA, self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        seeds = torch.randint(0, 2**62, (len(self.dataset),), generator=generator).tolist()
        positions = range(self.rank, self.total_size, self.num_replicas)[self.skip :]
        self.skip = 0
        for p in positions:
            yield order[p], seeds[p]


class ResumableLoader(DataLoader):
    """A DataLoader over :class:`ShuffledEpochs` whose ``state_dict`` is (epoch, batches served in it).

    Lightning saves the state of a loader that has ``state_dict`` / ``load_state_dict`` in every
    checkpoint and hands it back before a resumed fit's first batch (its loops restore their own
    position within the epoch); a plain DataLoader would start the epoch's data over. Batches are
    counted as they leave the loader, so worker prefetching does not shift the count.
    """

    sampler: ShuffledEpochs

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ShuffledEpochs, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self._served = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: this body runs at the first batch, after Lightning has set the sampler's epoch.
        if self._resume is not None and self._resume[0] == self.sampler.epoch:
            self._served = self._resume[1]
        else:  # a new epoch (also when the checkpoint was written at the end of the previous one)
            self._served = 0
        self._resume = None
        self.sampler.skip = self._served * self.batch_size
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))


class InMemoryDataModule(L.LightningDataModule):
    """Loads (images, labels, class names) once, splits off a fixed validation set, serves tensor batches.

    ``batch_size`` is the global batch: images per optimizer step, summed over all processes and
    accumulated micro-batches. :meth:`split_batch` divides it among them before a fit, so changing
    the number of GPUs or the accumulation leaves the experiment (and every cadence counted in
    optimizer steps) unchanged.

    ``val_fraction`` of the images (rounded) is held out for validation. ``val_fraction=0`` trains
    without validation (no val/loss, no best.ckpt), which :meth:`setup` warns about; a fraction
    above 0 that rounds to no image is refused, naming the fraction that holds out one.
    """

    def __init__(
        self, resolution: int, channels: int, batch_size: int = 64, val_fraction: float = 0.1,
        hflip: bool = False, split_seed: int = 0, seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
            raise ConfigError(
                f"dataset.resolution must be a positive integer (the side of the square images in pixels), "
                f"got {resolution!r}"
            )
        if batch_size <= 0:
            raise ConfigError(f"dataset.batch_size must be a positive integer, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"dataset.val_fraction must lie in [0, 1), got {val_fraction}")
        if channels not in (1, 3):
            raise ConfigError(f"dataset.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.resolution, self.channels, self.seed = resolution, channels, seed
        self.batch_size, self.val_fraction, self.hflip, self.split_seed = batch_size, val_fraction, hflip, split_seed
        self.device_batch_size = batch_size
        self.train_set: TensorImages | None = None
        self.val_set: TensorImages | None = None
        self.class_names: list[str] = []
        self.encoded: tuple[TensorImages, TensorImages] | None = None
        """(train, val) cached latents when training reads them (:meth:`serve_latents`)."""

    def serve_latents(self, train: TensorImages, val: TensorImages) -> None:
        """Have the loaders serve these latents (:func:`difflab.latent.cached_latents`) instead of the images;
        ``train_set`` / ``val_set`` stay the images (metrics compare samples to them)."""
        self.encoded = (train, val)

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
        n_val = self._num_val(len(images))
        val, train = order[:n_val], order[n_val:]
        if len(train) < self.batch_size:
            raise ConfigError(
                f"the training split has {len(train)} images, fewer than dataset.batch_size={self.batch_size}"
            )
        self.train_set = TensorImages(images[train], labels[train], self.hflip)
        self.val_set = TensorImages(images[val], labels[val])

    def _num_val(self, n: int) -> int:
        """The size of the validation split of ``n`` images; refused if it rounds to 0, warned about if it is 0."""
        if self.val_fraction == 0:
            warnings.warn(
                "dataset.val_fraction=0: no images are held out, so training runs no validation: no val/loss is "
                "logged and no checkpoints/best.ckpt is written (only last.ckpt and step_*.ckpt); set "
                "dataset.val_fraction > 0 to validate",
                stacklevel=3,
            )
            return 0
        n_val = int(round(self.val_fraction * n))
        if n_val == 0:
            needed = math.ceil(1e4 / n) / 1e4  # the fraction of one image, rounded up to 4 decimals
            one = f"dataset.val_fraction >= {needed:g} (one image), or " if needed < 1 else ""
            raise ConfigError(
                f"dataset.val_fraction={self.val_fraction} of {n} images rounds to 0 validation images: "
                f"use {one}dataset.val_fraction=0 to train without validation (no val/loss, no best.ckpt)"
            )
        return n_val

    @property
    def train_source(self) -> TensorImages:
        """What training reads: the training images, or their cached latents."""
        return self.train_set if self.encoded is None else self.encoded[0]

    @property
    def val_source(self) -> TensorImages:
        """What validation reads: the held-out images, or their cached latents."""
        return self.val_set if self.encoded is None else self.encoded[1]

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """(images (M, C, H, W) in [-1, 1], labels (M,)) of the ``train``, ``val`` or ``all`` split, un-augmented."""
        if name not in SPLITS:
            raise ConfigError(f"split={name!r} is not one of {', '.join(SPLITS)}")
        self.setup("fit")
        parts = {"train": [self.train_set], "val": [self.val_set], "all": [self.train_set, self.val_set]}[name]
        return torch.cat([part.images for part in parts]), torch.cat([part.labels for part in parts])

    def train_dataloader(self) -> ResumableLoader:
        """This process's share of the shuffled epochs (order and flips from ``seed`` and the epoch), resumable."""
        trainer = self.trainer
        ranks = {"num_replicas": trainer.world_size, "rank": trainer.global_rank} if trainer is not None else {}
        sampler = ShuffledEpochs(self.train_source, self.seed, **ranks)
        return ResumableLoader(self.train_source, self.device_batch_size, sampler, collate_fn=_batch_as_is)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_source, batch_size=self.device_batch_size, collate_fn=_batch_as_is)
