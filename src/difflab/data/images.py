"""Image sets a DataLoader reads: decoded in memory (:class:`TensorImages`) or decoded per batch (:class:`LazyImages`).

Both fetch a whole batch per call (``__getitems__``), so a DataLoader worker, or the main process
without workers, builds one batch at a time. An item is an index, or an (index, item seed) pair whose
seed decides the item's augmentation (the lowest bit: a horizontal flip): augmentations are drawn by
the sampler from counters, never from the global RNG or a worker's.

A batch is (images (B, C, H, W) in [-1, 1], labels (B,)), plus the B caption strings when the set has
captions: (images, labels, captions).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from difflab.errors import ConfigError

Item = int | tuple[int, int]
"""A dataset index, or (index, item seed) as :class:`~difflab.data.order.ShuffledEpochs` draws them."""


def batch_as_is(batch: Any) -> Any:
    """The collate function of datasets that return whole batches."""
    return batch


class Items(Dataset):
    """A source's undecoded items: item i decodes to one image (C, H, W) in [-1, 1]; subclasses give ``__getitem__``."""

    def __getitems__(self, indices: list[int]) -> Tensor:
        """The images (B, C, H, W) of ``indices``."""
        return torch.stack([self[i] for i in indices])

    def mirrored(self, indices: list[int], x: Tensor) -> Tensor:
        """What a flip serves for the items ``x`` (B, C, H, W) at ``indices``: x mirrored left-right."""
        return x.flip(-1)


def read_batches(items: Dataset, num_workers: int = 0, batch_size: int = 256) -> list[Any]:
    """The batches (``__getitems__`` results) of every item of ``items`` in order, read by ``num_workers`` workers.

    The loader's own generator seeds its workers, so reading leaves the global RNG (the model's init) untouched.
    """
    loader = DataLoader(
        items, batch_size=batch_size, num_workers=num_workers, collate_fn=batch_as_is, generator=torch.Generator()
    )
    try:
        return list(loader)
    except ConfigError as err:  # raised in a worker, re-raised here with its traceback in the message: keep the message
        raise ConfigError(str(err).rsplit("ConfigError: ", 1)[-1].strip()) from None


def decode_all(items: Items, num_workers: int = 0) -> Tensor:
    """Every item of ``items`` decoded, in order, as (N, C, H, W): the in-memory path's one pass over the source."""
    return torch.cat(read_batches(items, num_workers))


class ImageSet(Dataset):
    """Images with labels (N,) and optional captions (N strings), fetched a batch at a time, optionally flipped."""

    def __init__(self, labels: Tensor, hflip: bool = False, captions: list[str] | None = None) -> None:
        self.labels, self.hflip, self.captions = labels, hflip, captions

    def __len__(self) -> int:
        return self.labels.shape[0]

    def fetch(self, idx: list[int]) -> Tensor:
        """The un-augmented images (B, C, H, W) at positions ``idx``."""
        raise NotImplementedError

    def mirrored(self, idx: list[int], x: Tensor) -> Tensor:
        """What a flip serves for the images ``x`` at ``idx``: x mirrored left-right."""
        return x.flip(-1)

    def head(self, n: int) -> Tensor:
        """The first ``n`` images (n, C, H, W), un-augmented."""
        return self.fetch(list(range(min(n, len(self)))))

    @property
    def images(self) -> Tensor:
        """All images (N, C, H, W), un-augmented."""
        return self.fetch(list(range(len(self))))

    def __getitem__(self, item: Item) -> tuple[Any, ...]:
        return self.__getitems__([item])

    def __getitems__(self, items: list[Item]) -> tuple[Any, ...]:
        pairs = [item if isinstance(item, tuple) else (item, 0) for item in items]
        idx = [i for i, _ in pairs]
        x = self.fetch(idx)
        if self.hflip:
            flips = torch.tensor([s & 1 for _, s in pairs], dtype=torch.bool)
            x = torch.where(flips[:, None, None, None], self.mirrored(idx, x), x)
        batch = (x, self.labels[idx])
        return batch if self.captions is None else (*batch, [self.captions[i] for i in idx])


class TensorImages(ImageSet):
    """Images (N, C, H, W) in [-1, 1] held in memory.

    ``flipped`` (N, ...), when given, is what a flip serves instead of the mirrored item (cached latents of
    the mirrored images: a mirrored latent is not the latent of the mirrored image).
    """

    def __init__(
        self, images: Tensor, labels: Tensor, hflip: bool = False, flipped: Tensor | None = None,
        captions: list[str] | None = None,
    ) -> None:
        super().__init__(labels, hflip, captions)
        self.tensor, self.flipped = images, flipped

    @property
    def images(self) -> Tensor:
        return self.tensor

    def fetch(self, idx: list[int]) -> Tensor:
        return self.tensor[idx]

    def mirrored(self, idx: list[int], x: Tensor) -> Tensor:
        return x.flip(-1) if self.flipped is None else self.flipped[idx]


class LazyImages(ImageSet):
    """The items ``positions`` (N,) of a source, decoded when a batch is fetched (in a DataLoader worker)."""

    def __init__(
        self, items: Items, positions: list[int], labels: Tensor, hflip: bool = False,
        captions: list[str] | None = None,
    ) -> None:
        super().__init__(labels, hflip, captions)
        self.items, self.positions = items, positions

    def fetch(self, idx: list[int]) -> Tensor:
        return self.items.__getitems__([self.positions[i] for i in idx])

    def mirrored(self, idx: list[int], x: Tensor) -> Tensor:
        return self.items.mirrored([self.positions[i] for i in idx], x)
