"""``dataset=shards``: a directory of WebDataset tar shards (``*.tar``), read by random access.

A shard holds samples as tar members ``KEY.png`` (or .jpg / .jpeg / .webp), ``KEY.cls`` (the label),
``KEY.txt`` (the caption), and with precomputed VAE latents ``KEY.latent.npy`` (+ ``KEY.flipped.npy``, the
latent of the mirrored image), as ``python -m difflab.data.write_shards`` writes them (WebDataset's
``ShardWriter``, so any WebDataset pipeline reads them too). Opening the directory scans the tar headers
(no image is decoded) into a table of member offsets; a batch then reads its members with one seek each,
in DataLoader workers. The training order is therefore the exact global shuffle of every other source
(:class:`~difflab.data.order.ShuffledEpochs`): each sample once per epoch over all ranks, and exact
resume mid-epoch after a requeue. Written by hand because WebDataset's own iteration splits whole shards
among ranks and workers (unequal counts per rank unless the shards divide evenly) and resumes only by
replaying the stream (docs/data.md).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from difflab.data.base import Catalog, ImageDataModule
from difflab.data.image_folder import image_tensor
from difflab.data.images import Items
from difflab.errors import ConfigError

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
META_FILE = "dataset.json"
"""The writer's description of a shard directory: class names, image shape, the VAE of the latents (if any)."""


def scan(shard: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """{sample key: {extension: (data offset, size)}} of a tar shard, from its headers alone."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                if member.isfile() and "." in base:
                    key, ext = base.split(".", 1)  # the extension starts at the file name's first dot
                    samples.setdefault(f"{folder}/{key}", {})[ext] = (member.offset_data, member.size)
    except tarfile.TarError as err:
        raise ConfigError(f"shard {shard} is not a readable (uncompressed) tar file: {err}") from err
    return samples


class ShardMembers(Items):
    """Samples of tar shards read by offset: images decoded by :func:`image_tensor`, or stored latents."""

    def __init__(self, shards: list[Path], table: list[tuple[int, dict[str, tuple[int, int]]]], field: str,
                 resolution: int, channels: int) -> None:
        self.shards, self.table, self.field = shards, table, field
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.table)

    def read(self, i: int, ext: str) -> bytes:
        """The bytes of sample ``i``'s member ``ext``."""
        return self.read_all(ext, [i])[0]

    def read_all(self, ext: str, indices: list[int] | None = None) -> list[bytes]:
        """The bytes of member ``ext`` of each sample (all by default), opening each shard once."""
        indices = range(len(self.table)) if indices is None else indices
        out, handles = [], {}
        try:
            for i in indices:
                shard, members = self.table[i]
                f = handles.get(shard) or handles.setdefault(shard, open(self.shards[shard], "rb"))  # noqa: SIM115
                offset, size = members[ext]
                f.seek(offset)
                out.append(f.read(size))
        finally:
            for f in handles.values():
                f.close()
        return out

    def __getitem__(self, i: int) -> Tensor:
        if self.field.endswith(".npy"):
            return torch.from_numpy(np.load(io.BytesIO(self.read(i, self.field)), allow_pickle=False))
        ext = next(e for e in IMAGE_KEYS if e in self.table[i][1])
        with Image.open(io.BytesIO(self.read(i, ext))) as img:
            return image_tensor(img, self.resolution, self.channels, f"{self.shards[self.table[i][0]]}:{i}")

    def mirrored(self, indices: list[int], x: Tensor) -> Tensor:
        if self.field != "latent.npy":
            return x.flip(-1)
        stored = self.read_all("flipped.npy", indices)
        return torch.stack([torch.from_numpy(np.load(io.BytesIO(b), allow_pickle=False)) for b in stored])


class ShardsDataModule(ImageDataModule):
    """The tar shards under ``path`` (a local directory), their images or, with ``latents=true``, their latents."""

    def __init__(self, path: str, latents: bool = False, resolution: int = 32, channels: int = 3, **kwargs) -> None:
        super().__init__(resolution=resolution, channels=channels, **kwargs)
        self.path = Path(path).expanduser() if path else None
        self.latents = latents
        self.meta: dict[str, Any] = {}

    @property
    def item_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["latent"]["shape"]) if self.latents else self.image_shape

    def catalog(self) -> Catalog:
        if self.path is None or "://" in str(self.path) or not self.path.is_dir():
            raise ConfigError(f"dataset.path={self.path} is not a local directory of tar shards (*.tar)")
        shards = sorted(self.path.glob("*.tar"))
        if not shards:
            raise ConfigError(f"dataset.path={self.path} holds no shards (*.tar): write them with "
                              "python -m difflab.data.write_shards")
        meta_file = self.path / META_FILE
        self.meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if self.latents and not self.meta.get("latent"):
            raise ConfigError(f"dataset.latents=true but the shards under {self.path} hold no latents: write them "
                              "with python -m difflab.data.write_shards latent=vae latent.path=VAE")
        if self.latents:
            self.stored_latents = self.meta["latent"]
            if self.meta["image_shape"] != list(self.image_shape):
                raise ConfigError(f"the latents under {self.path} are of images {tuple(self.meta['image_shape'])}: set "
                                  f"dataset.channels and dataset.resolution to them, not {self.image_shape}")
        field = "latent.npy" if self.latents else "image"
        table = []
        for s, shard in enumerate(shards):
            for key, members in sorted(scan(shard).items()):
                if field in members or (field == "image" and any(e in members for e in IMAGE_KEYS)):
                    table.append((s, members))
        if not table:
            raise ConfigError(f"the shards under {self.path} hold no samples with an image ({', '.join(IMAGE_KEYS)})")
        items = ShardMembers(shards, table, field, self.resolution, self.channels)
        labelled = all("cls" in m for _, m in table)
        labels = torch.tensor([int(b) for b in items.read_all("cls")] if labelled else [0] * len(table))
        captions = [b.decode() for b in items.read_all("txt")] if all("txt" in m for _, m in table) else None
        return Catalog(items, labels, list(self.meta.get("class_names", [])), captions)
