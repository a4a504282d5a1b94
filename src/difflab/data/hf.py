"""A Hugging Face ``datasets`` dataset from a local path: ``save_to_disk`` output, parquet / arrow files, or an
``imagefolder`` (images with an optional ``metadata.jsonl``). Nothing is downloaded: every form is read by
``datasets.load_from_disk`` or a packaged builder of ``datasets.load_dataset`` (``HF_DATASETS_OFFLINE=1`` is
honoured), and the image column is decoded per batch in DataLoader workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from difflab.data.base import Catalog, ImageDataModule
from difflab.data.image_folder import image_tensor
from difflab.data.images import Items
from difflab.errors import ConfigError

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
"""Builders of ``datasets.load_dataset`` for a folder of data files, by suffix (else ``imagefolder``)."""


def open_local(path: Path, split: str) -> Any:
    """The ``split`` of the dataset stored at ``path`` (a ``datasets.Dataset``), read without network access."""
    import datasets

    if not path.is_dir():
        raise ConfigError(f"dataset.path={path} is not a directory: set it to a save_to_disk folder, a folder of "
                          "parquet / arrow files or an imagefolder")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        ds = datasets.load_from_disk(str(path))
    else:
        suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
        builder = next((b for s, b in FILE_BUILDERS.items() if s in suffixes), "imagefolder")
        ds = datasets.load_dataset(builder, data_dir=str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"dataset.split={split!r} is not a split of {path}: it has {', '.join(ds)}")
        ds = ds[split]
    if len(ds) == 0:
        raise ConfigError(f"dataset.path={path} (split {split}) holds no rows")
    return ds


class HFImages(Items):
    """The ``column`` of a ``datasets.Dataset`` decoded to PIL images and then by :func:`image_tensor`."""

    def __init__(self, ds: Any, column: str, resolution: int, channels: int) -> None:
        self.ds, self.column, self.resolution, self.channels = ds.select_columns([column]), column, resolution, channels

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Tensor:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> Tensor:
        images: list[Image.Image] = self.ds[indices][self.column]
        return torch.stack([image_tensor(img, self.resolution, self.channels, f"row {i}") for i, img in zip(indices, images)])


class HFDataModule(ImageDataModule):
    """Rows of a local Hugging Face dataset: images from ``image_column``, class labels from ``label_column``
    (a ``ClassLabel`` keeps its names; strings become sorted class names; integers are named by their number;
    null: unlabeled), captions from
    ``caption_column`` (null: none)."""

    def __init__(
        self, path: str, split: str = "train", image_column: str = "image", label_column: str | None = None,
        caption_column: str | None = None, resolution: int = 32, channels: int = 3, **kwargs,
    ) -> None:
        super().__init__(resolution=resolution, channels=channels, **kwargs)
        self.path = Path(path).expanduser() if path else None
        self.split_name, self.image_column = split, image_column
        self.label_column, self.caption_column = label_column, caption_column

    def catalog(self) -> Catalog:
        import datasets

        ds = open_local(self.path, self.split_name)
        for key in ("image_column", "label_column", "caption_column"):
            column = getattr(self, key)
            if column is not None and column not in ds.column_names:
                raise ConfigError(f"dataset.{key}={column!r} is not a column of {self.path}: it has "
                                  f"{', '.join(ds.column_names)}")
        if not isinstance(ds.features[self.image_column], datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image())
        labels, names = torch.zeros(len(ds), dtype=torch.long), []
        if self.label_column is not None:
            values, feature = ds[self.label_column], ds.features[self.label_column]
            if isinstance(feature, datasets.ClassLabel):
                names = list(feature.names)
            elif values and isinstance(values[0], str):
                names = sorted(set(values))
                values = [names.index(v) for v in values]
            else:  # integer ids 0..K-1 are named by their number
                names = [str(k) for k in range(max(values) + 1)]
            labels = torch.tensor(values, dtype=torch.long)
        captions = None if self.caption_column is None else [str(c) for c in ds[self.caption_column]]
        return Catalog(HFImages(ds, self.image_column, self.resolution, self.channels), labels, names, captions)
