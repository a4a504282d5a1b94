"""A folder of the user's images, flat or one sub-folder per class (the ImageFolder layout).

Every file's header is checked before training (a zero-byte file, a file that is no image, an image
smaller than ``resolution`` or over the pixel limit is named, or skipped with a warning and a count
when ``skip_bad=true``); the pixels are decoded later, in DataLoader workers on the lazy path.

Modes are converted to ``channels``: palette (P), gray (L, LA), RGB, RGBA and CMYK images by Pillow's
``convert`` (an alpha channel is dropped: the colour under it is kept). Images are read upright (their EXIF orientation applied) on the scale of their bit depth: 8-bit
images as 0..255, 16-bit ones (modes I;16, I;16B, ...) divided by 65535, 32-bit integer ones (mode I,
as Pillow opens some 16-bit files) on the same 16-bit scale, float ones (mode F) as [0, 1]; values
outside that scale are refused rather than clipped.

Captions (``captions=true``, which ``conditioning=text`` sets) come from ``metadata.jsonl`` or ``metadata.csv`` at the
folder's top level, one row per image with its path relative to the folder in ``file_name`` and its caption in
``caption_column`` (``text``): the layout of the Hugging Face ``imagefolder`` loader and diffusers' text-to-image
scripts. The file is checked before training: rows naming no image, images named twice and images without a row are
refused (the latter get the empty prompt with ``allow_missing_captions=true``).
"""

from __future__ import annotations

import csv
import json
import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from difflab.data.base import Catalog, ImageDataModule
from difflab.data.images import Items, read_batches
from difflab.errors import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PILLOW_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
"""Pillow's decompression-bomb limit (pixels), the default of ``dataset.max_image_pixels``."""
SHOWN = 5
"""How many offending file names an error lists before '...'."""
CAPTION_FILES = ("metadata.jsonl", "metadata.csv")
"""The caption files of a folder (the Hugging Face ``imagefolder`` names), at its top level."""


def _full_scale(mode: str) -> float | None:
    """The value of white in a high-bit-depth mode (65535 for 16- and 32-bit integers, 1 for floats), else None."""
    if mode == "F":
        return 1.0
    if mode == "I" or mode.startswith("I;16"):
        return 65535.0
    return None


@contextmanager
def _no_pillow_pixel_limit() -> Iterator[None]:
    """Pillow's own decompression-bomb check off (``dataset.max_image_pixels`` is checked instead), then restored."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _on_8bit_scale(img: Image.Image, full: float, path: object) -> Image.Image:
    """A high-bit-depth image as mode F on the 8-bit scale [0, 255] (white ``full`` -> 255)."""
    x = np.asarray(img, dtype=np.float32)
    if not np.all((x >= 0) & (x <= full)):
        raise ConfigError(
            f"image {path} (mode {img.mode}) has values in [{x.min():g}, {x.max():g}], outside [0, {full:g}], the "
            f"range mode {img.mode} is read in: rescale it to [0, {full:g}], or save it as an 8- or 16-bit PNG"
        )
    return Image.fromarray(x * np.float32(255 / full))


def too_many_pixels(width: int, height: int, max_image_pixels: int) -> str | None:
    """Why an image of width x height is refused as a decompression bomb, or None if it is within the limit."""
    if width * height <= max_image_pixels:
        return None
    return (
        f"has {width}x{height} = {width * height} pixels, more than dataset.max_image_pixels={max_image_pixels} "
        f"(the decompression-bomb limit, by default Pillow's PIL.Image.MAX_IMAGE_PIXELS={PILLOW_MAX_IMAGE_PIXELS}): "
        "if you trust the file, raise dataset.max_image_pixels above its pixel count, or shrink the image"
    )


def image_tensor(img: Image.Image, resolution: int, channels: int, name: object) -> Tensor:
    """An opened image upright, in ``channels``, resized (shorter side) and centre-cropped: (C, H, W) in [-1, 1]."""
    img = ImageOps.exif_transpose(img)
    full = _full_scale(img.mode)
    img = _on_8bit_scale(img, full, name) if full else img.convert("L" if channels == 1 else "RGB")
    img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32)
    if x.ndim == 2 and channels == 3:  # a high-bit-depth gray image: gray to RGB copies it, as Pillow's convert does
        x = np.repeat(x[:, :, None], 3, axis=2)
    x = torch.from_numpy(np.clip(x, 0, 255)).reshape(resolution, resolution, channels)  # clip: bicubic overshoot
    return x.permute(2, 0, 1) / 127.5 - 1


def load_image(path: Path, resolution: int, channels: int, max_image_pixels: int = PILLOW_MAX_IMAGE_PIXELS) -> Tensor:
    """One image file as :func:`image_tensor`; more than ``max_image_pixels`` pixels are refused before decoding."""
    try:
        with _no_pillow_pixel_limit(), Image.open(path) as img:
            if problem := too_many_pixels(img.width, img.height, max_image_pixels):
                raise ConfigError(f"image {path} {problem}")
            return image_tensor(img, resolution, channels, path)
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError(
            f"cannot read image {path}: {err} (every file with an image extension under dataset.path must be an "
            "image file PIL can open: remove or replace it)"
        ) from err


def _listing(names: list[str]) -> str:
    """The first few of ``names``, comma-separated, '...' if there are more."""
    return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
"""The 8 bytes every PNG file starts with (PNG spec 5.2)."""


def png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (bytes 16-24, big-endian), or None if ``path`` does not start as one.

    Hand-written because it is 2-8x faster than ``PIL.Image.open`` per file (docs/benchmarks.md, ``python -m
    bench.data headers``), and the header check of a 100,000-image folder runs before the first step.
    """
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def header_problem(path: Path, resolution: int, max_image_pixels: int, upscale: bool) -> str | None:
    """Why ``path`` cannot be trained on, from its size and header alone (no decoding), or None if it can."""
    if path.stat().st_size == 0:
        return "is empty (0 bytes)"
    try:
        size = png_size(path)
        if size is None:  # other formats, and files that only claim to be PNGs: Pillow reads the header
            with _no_pillow_pixel_limit(), Image.open(path) as img:
                size = img.size
    except (UnidentifiedImageError, OSError) as err:
        return f"is not an image PIL can open ({err})"
    width, height = size
    if problem := too_many_pixels(width, height, max_image_pixels):
        return problem
    if min(width, height) < resolution and not upscale:
        return (
            f"is {width}x{height}, smaller than dataset.resolution={resolution} on its shorter side: lower "
            "dataset.resolution, or set dataset.upscale=true to enlarge small images"
        )
    return None


def caption_rows(path: Path, caption_column: str) -> tuple[Path, list[tuple[str, object]]]:
    """The caption file under ``path`` and its (file_name, caption) rows; refuses a missing file or column.

    Hand-read with the standard library's ``json`` / ``csv`` rather than through ``datasets``' imagefolder builder:
    the checks need each row's ``file_name`` as written, to name the bad ones."""
    found = [path / name for name in CAPTION_FILES if (path / name).is_file()]
    expected = f"columns file_name (the image's path relative to the folder) and {caption_column} (its caption)"
    if not found:
        raise ConfigError(
            f"dataset.path={path} has no caption file: conditioning=text reads {path / CAPTION_FILES[0]} (one JSON "
            f"object per line) or {path / CAPTION_FILES[1]}, with {expected}; set dataset.caption_column to use "
            "another caption column"
        )
    if len(found) > 1:
        raise ConfigError(f"dataset.path={path} holds both {' and '.join(CAPTION_FILES)}: keep one caption file")
    file = found[0]
    try:
        with file.open(newline="", encoding="utf-8") as f:
            if file.suffix == ".csv":
                rows = list(csv.DictReader(f))
            else:
                rows = [json.loads(line) for line in f if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"cannot read caption file {file}: {err}") from err
    for k, row in enumerate(rows, 1):
        missing = [c for c in ("file_name", caption_column) if not isinstance(row, dict) or c not in row]
        if missing:
            has = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"caption file {file} row {k} has no {' or '.join(missing)} (it has {has}): every row "
                              f"needs {expected}")
        if not isinstance(row[caption_column], str):
            raise ConfigError(f"caption file {file} row {k} ({row['file_name']}): {caption_column}="
                              f"{row[caption_column]!r} is not a string")
    return file, [(str(row["file_name"]), row[caption_column]) for row in rows]


class ImageFiles(Items):
    """Image files decoded by :func:`load_image` when fetched."""

    def __init__(self, files: list[Path], resolution: int, channels: int, max_image_pixels: int) -> None:
        self.files, self.resolution, self.channels, self.max_image_pixels = files, resolution, channels, max_image_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        return load_image(self.files[i], self.resolution, self.channels, self.max_image_pixels)


class FileProblems(Dataset):
    """The header problem of each file (``''`` for none), computed in DataLoader workers."""

    def __init__(self, files: list[Path], resolution: int, max_image_pixels: int, upscale: bool) -> None:
        self.files, self.args = files, (resolution, max_image_pixels, upscale)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> str:
        return header_problem(self.files[i], *self.args) or ""

    def __getitems__(self, indices: list[int]) -> list[str]:
        return [self[i] for i in indices]


class ImageFolderDataModule(ImageDataModule):
    """Images under ``path``: either one sub-folder per class (sorted names), or flat (one unlabeled set).

    ``max_image_pixels``: images with more pixels are refused as decompression bombs (default Pillow's limit).
    ``skip_bad``: leave out unreadable, empty, too-small or too-large files with a warning that counts them,
    instead of refusing the folder. ``upscale``: enlarge images smaller than ``resolution`` instead of refusing them.
    ``captions``: read a caption per image from the folder's caption file (column ``caption_column``);
    ``allow_missing_captions``: images without a row get the empty prompt instead of being refused.
    """

    def __init__(
        self, path: str, resolution: int = 32, channels: int = 3, max_image_pixels: int = PILLOW_MAX_IMAGE_PIXELS,
        skip_bad: bool = False, upscale: bool = False, captions: bool = False, caption_column: str = "text",
        allow_missing_captions: bool = False, **kwargs,
    ) -> None:
        super().__init__(resolution=resolution, channels=channels, **kwargs)
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels <= 0:
            raise ConfigError(
                f"dataset.max_image_pixels must be a positive integer (Pillow's default is {PILLOW_MAX_IMAGE_PIXELS}),"
                f" got {max_image_pixels!r}"
            )
        self.path = Path(path).expanduser() if path else None
        self.max_image_pixels, self.skip_bad, self.upscale = max_image_pixels, skip_bad, upscale
        self.with_captions, self.caption_column = captions, caption_column
        self.allow_missing_captions = allow_missing_captions

    def captions_of(self, files: list[Path]) -> list[str]:
        """The caption of each of ``files`` from the folder's caption file ('' for none, if allowed); refuses rows
        naming no image, images named twice and (unless ``allow_missing_captions``) images without a row."""
        file, rows = caption_rows(self.path, self.caption_column)
        index = {f.relative_to(self.path).as_posix(): k for k, f in enumerate(files)}
        captions: list[str | None] = [None] * len(files)
        unknown, twice = [], []
        for name, caption in rows:
            k = index.get(os.path.normpath(name).replace(os.sep, "/"))
            if k is None:
                unknown.append(name)
            elif captions[k] is not None:
                twice.append(name)
            else:
                captions[k] = caption
        if unknown:
            raise ConfigError(
                f"{file} names {len(unknown)} file(s) that are not images under dataset.path={self.path}: "
                f"{_listing(unknown)} (file_name is the image's path relative to that folder; fix or remove those rows)"
            )
        if twice:
            raise ConfigError(
                f"{file} gives {len(twice)} image(s) a second caption row: {_listing(twice)} (keep one row per image)"
            )
        uncaptioned = [f.relative_to(self.path).as_posix() for f, c in zip(files, captions) if c is None]
        if uncaptioned and not self.allow_missing_captions:
            raise ConfigError(
                f"{len(uncaptioned)} of the {len(files)} images under dataset.path={self.path} have no caption in "
                f"{file}: {_listing(uncaptioned)} (add a row for each, or set dataset.allow_missing_captions=true to "
                "train them with the empty prompt)"
            )
        return ["" if c is None else c for c in captions]

    def files(self) -> tuple[list[Path], list[int], list[str]]:
        """Image files, their class index and the class names; class folders beside top-level images are refused."""
        if self.path is None or not self.path.is_dir():
            raise ConfigError(f"dataset.path={self.path} is not a directory: set dataset.path=DIR to a folder of images")
        class_dirs = sorted(p for p in self.path.iterdir() if p.is_dir() and not p.name.startswith("."))
        top_files = sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        groups = [(d.name, sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)) for d in class_dirs]
        groups = [(name, files) for name, files in groups if files]
        if groups and top_files:
            raise ConfigError(
                f"dataset.path={self.path} holds class sub-folders ({_listing([name for name, _ in groups])}) and also "
                f"{len(top_files)} image(s) at its top level ({_listing([p.name for p in top_files])}): a dataset "
                "folder is either one sub-folder per class or flat; move the top-level images into a class folder "
                "or remove them"
            )
        if not groups:
            groups = [("", sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS))]
        files = [f for _, fs in groups for f in fs]
        if not files:
            raise ConfigError(
                f"dataset.path={self.path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        labels = [k for k, (_, fs) in enumerate(groups) for _ in fs]
        names = [name for name, _ in groups] if groups[0][0] else []
        return files, labels, names

    def readable(self, files: list[Path]) -> list[bool]:
        """Whether each file passes :func:`header_problem`; refuses the folder naming the bad ones unless skip_bad."""
        checks = FileProblems(files, self.resolution, self.max_image_pixels, self.upscale)
        problems = [p for batch in read_batches(checks, self.num_workers) for p in batch]
        bad = [f"{f} {p}" for f, p in zip(files, problems) if p]
        if bad and not self.skip_bad:
            raise ConfigError(
                f"{len(bad)} of the {len(files)} images under dataset.path={self.path} cannot be trained on: "
                f"{'; '.join(bad[:SHOWN])}{'; ...' if len(bad) > SHOWN else ''} (remove or replace them, or set "
                "dataset.skip_bad=true to leave them out)"
            )
        if bad:
            warnings.warn(f"dataset.skip_bad=true: skipped {len(bad)} of {len(files)} images: {bad[0]}", stacklevel=2)
        return [not p for p in problems]

    def catalog(self) -> Catalog:
        files, labels, names = self.files()
        captions = self.captions_of(files) if self.with_captions else None  # before the headers: the cheaper check
        keep = self.readable(files)
        files = [f for f, k in zip(files, keep) if k]
        captions = None if captions is None else [c for c, k in zip(captions, keep) if k]
        if not files:
            raise ConfigError(f"dataset.path={self.path}: every image was skipped (dataset.skip_bad=true)")
        labels = [y for y, k in zip(labels, keep) if k]
        items = ImageFiles(files, self.resolution, self.channels, self.max_image_pixels)
        return Catalog(items, torch.tensor(labels, dtype=torch.long), names, captions)

