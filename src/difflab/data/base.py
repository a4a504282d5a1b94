"""Image DataModules: a source lists its items (:class:`Catalog`), the module splits, decodes and serves them.

Small sets are decoded once into one tensor and batches are index slices (measured on 2 cores: DataLoader
workers cost 10-30x more per batch than indexing a tensor in the main process); sets whose decoded
tensor would exceed :data:`IN_MEMORY_MAX_BYTES` are decoded a batch at a time in DataLoader workers
(``num_workers``, persistent, pinned memory on a GPU), so memory does not grow with the dataset
(``in_memory=auto``, the default; ``true`` / ``false`` force either path). The order, flips and
resume of the training stream are the same on both paths (:mod:`difflab.data.order`).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from difflab.data.images import ImageSet, Items, LazyImages, TensorImages, batch_as_is, decode_all
from difflab.data.order import ResumableLoader, ShuffledEpochs
from difflab.distributed import device_batch_size
from difflab.errors import ConfigError
from difflab.seeding import DATA, derived_generator

SPLITS = ("train", "val", "all")
"""The image sets of a DataModule: its training split, its held-out validation split, or both."""
IN_MEMORY_MAX_BYTES = 256 * 2**20
"""in_memory=auto decodes a set into memory when its float32 tensor is at most this (docs/data.md, bench/data.py)."""


@dataclass
class Catalog:
    """A source's items listed without decoding them: the decoder of each, labels (N,), class names, captions."""

    items: Items
    labels: Tensor
    class_names: list[str]
    captions: list[str] | None = None


def training_batches(datamodule: ImageDataModule, batch_size: int = 256) -> list[Tensor]:
    """Every training image once, flipped as in training, in batches (B, C, H, W): the stream a model sees.

    Unlike one epoch of the training loader, no image is dropped to fill the last batch; each image's
    flip comes from an item seed of epoch 0's generator, so the batches are a function of the seed alone.
    """
    datamodule.setup("fit")
    source = datamodule.train_source
    generator = derived_generator(datamodule.seed, DATA, 0)
    items = list(zip(range(len(source)), torch.randint(0, 2**62, (len(source),), generator=generator).tolist()))
    loader = DataLoader(source, batch_size=batch_size, sampler=items, collate_fn=batch_as_is, **datamodule.workers())
    return [batch[0] for batch in loader]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ImageDataModule(L.LightningDataModule):
    """Lists a source's items once (:meth:`catalog`), splits off a fixed validation set, serves batches.

    ``batch_size`` is the global batch: images per optimizer step, summed over all processes and
    accumulated micro-batches. :meth:`split_batch` divides it among them before a fit, so changing
    the number of GPUs or the accumulation leaves the experiment (and every cadence counted in
    optimizer steps) unchanged.

    ``val_fraction`` of the images (rounded) is held out for validation. ``val_fraction=0`` trains
    without validation (no val/loss, no best.ckpt), which :meth:`setup` warns about; a fraction
    above 0 that rounds to no image is refused, naming the fraction that holds out one.

    ``in_memory``: ``auto`` decodes the set once into memory when its tensor is at most
    :data:`IN_MEMORY_MAX_BYTES`, else decodes each batch in ``num_workers`` DataLoader workers;
    ``true`` / ``false`` force either. ``num_workers`` must be at most the CPUs this process may use.
    """

    def __init__(
        self, resolution: int, channels: int, batch_size: int = 64, val_fraction: float = 0.1,
        hflip: bool = False, split_seed: int = 0, seed: int = 0, in_memory: bool | str = "auto", num_workers: int = 0,
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
        if in_memory not in (True, False, "auto"):
            raise ConfigError(f"dataset.in_memory must be auto, true or false, got {in_memory!r}")
        cpus = usable_cpus()
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or not 0 <= num_workers <= cpus:
            raise ConfigError(
                f"dataset.num_workers={num_workers!r} cannot start here: it must be an integer from 0 (decode in the "
                f"training process) to {cpus}, the CPUs this process may use"
            )
        self.in_memory, self.num_workers = in_memory, num_workers
        self.resolution, self.channels, self.seed = resolution, channels, seed
        self.batch_size, self.val_fraction, self.hflip, self.split_seed = batch_size, val_fraction, hflip, split_seed
        self.device_batch_size = batch_size
        self.train_set: ImageSet | None = None
        self.val_set: ImageSet | None = None
        self.class_names: list[str] = []
        self.captions: list[str] | None = None
        """One caption per item in the source's order when the source has captions, else None."""
        self.stored_latents: dict | None = None
        """The VAE (fingerprint, shape, posterior) of the latents the source serves instead of images, if it does."""
        self.decoded_in_memory = False
        self.loaders: list[DataLoader] = []
        """The loaders handed out, whose persistent workers :meth:`teardown` stops."""
        """Whether :meth:`setup` decoded the set into memory (``in_memory``, or ``auto`` below the threshold)."""
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

    def catalog(self) -> Catalog:
        """The source's items, labels (N,) long, class names and captions, listed without decoding the images."""
        raise NotImplementedError

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape (C, H, W) of one image."""
        return (self.channels, self.resolution, self.resolution)

    @property
    def item_shape(self) -> tuple[int, ...]:
        """The shape of one item as the loaders serve it: the image's, or a stored latent's."""
        return self.image_shape

    def workers(self) -> dict[str, object]:
        """DataLoader settings of the lazy path: workers (kept between epochs), pinned memory on a GPU."""
        if self.decoded_in_memory:
            return {}
        on_gpu = self.trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
        workers = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        return {**workers, "pin_memory": on_gpu}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        catalog = self.catalog()
        labels, self.class_names, self.captions = catalog.labels, catalog.class_names, catalog.captions
        first = tuple(catalog.items.__getitems__([0]).shape[1:])
        if first != self.item_shape:
            raise ConfigError(f"dataset gives items of shape {first}, expected {self.item_shape}")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = self._num_val(len(labels))
        val, train = order[:n_val], order[n_val:]
        if len(train) < self.batch_size:
            raise ConfigError(
                f"the training split has {len(train)} images, fewer than dataset.batch_size={self.batch_size}"
            )
        nbytes = 4 * len(labels) * math.prod(self.item_shape)
        self.decoded_in_memory = nbytes <= IN_MEMORY_MAX_BYTES if self.in_memory == "auto" else self.in_memory
        captions = (lambda idx: None) if self.captions is None else (lambda idx: [self.captions[i] for i in idx])
        if self.decoded_in_memory:
            images = decode_all(catalog.items, self.num_workers)
            self.train_set = TensorImages(images[train], labels[train], self.hflip, captions=captions(train))
            self.val_set = TensorImages(images[val], labels[val], captions=captions(val))
        else:
            self.train_set = LazyImages(catalog.items, train.tolist(), labels[train], self.hflip, captions(train))
            self.val_set = LazyImages(catalog.items, val.tolist(), labels[val], captions=captions(val))

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
    def train_source(self) -> ImageSet:
        """What training reads: the training images, or their cached latents."""
        return self.train_set if self.encoded is None else self.encoded[0]

    @property
    def val_source(self) -> ImageSet:
        """What validation reads: the held-out images, or their cached latents."""
        return self.val_set if self.encoded is None else self.encoded[1]

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """(images (M, C, H, W) in [-1, 1], labels (M,)) of the ``train``, ``val`` or ``all`` split, un-augmented
        (decoded whole, also on the lazy path)."""
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
        loader = ResumableLoader(self.train_source, self.device_batch_size, sampler, collate_fn=batch_as_is, **self.workers())
        self.loaders.append(loader)
        return loader

    def val_dataloader(self) -> DataLoader:
        loader = DataLoader(self.val_source, batch_size=self.device_batch_size, collate_fn=batch_as_is, **self.workers())
        self.loaders.append(loader)
        return loader

    def teardown(self, stage: str) -> None:
        """Stop the loaders' persistent workers at the end of a fit, not when the loaders are garbage-collected."""
        for loader in self.loaders:
            if getattr(loader, "_iterator", None) is not None and loader.persistent_workers:
                loader._iterator._shutdown_workers()
                loader._iterator = None
        self.loaders = []
