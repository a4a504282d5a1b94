"""Real-data reference features for FID / KID, computed once and cached on disk under a fingerprint.

The fingerprint is the sha256 of a manifest holding everything that changes the features:

- ``source``: the dataset's settings (DataModule class, resolution, channels, split settings,
  folder path, ...) and the split used (``train``, ``val`` or ``all``);
- ``images_sha256``: a digest of the exact image tensor the features are computed from, so a
  changed file in an image folder, another resize or any other preprocessing change is caught
  even where the settings look the same;
- ``features``: the extractor's fingerprint (its weights digest and its preprocessing);
- the number and shape of the images, and ``version``, bumped when this computation changes.

A cache entry is ``<cache_dir>/<fingerprint>.pt`` ({"manifest", "features" (M, d) float32}) with
a readable ``<fingerprint>.json`` beside it, both written atomically; an entry is reused only
if its stored manifest equals the one asked for, so a stale entry is never read. The default
``cache_dir`` is ``~/.cache/difflab/reference`` (:func:`~difflab.cache.cache_root`):
one place shared by every run, sweep job and evaluation of the machine, outside the output
trees that users clean up; the fingerprint makes that sharing safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.checkpointing import atomic_write
from difflab.distributed import tensor_digest
from difflab.cache import cache_root
from difflab.metrics.features import FeatureExtractor, extract_features

log = logging.getLogger(__name__)

REFERENCE_VERSION = 1
"""Bumped whenever the way reference features are computed changes: older cache entries then miss."""
DATASET_SETTINGS = ("resolution", "channels", "val_fraction", "split_seed", "hflip", "path")
"""DataModule attributes that decide which images a split holds and how they look (``batch_size`` does not)."""


def dataset_description(datamodule: Any) -> dict[str, Any]:
    """The settings of an in-memory DataModule that shape its images, as JSON-able values."""
    cls = type(datamodule)
    described: dict[str, Any] = {"datamodule": f"{cls.__module__}.{cls.__qualname__}"}
    for key in DATASET_SETTINGS:
        if hasattr(datamodule, key):
            value = getattr(datamodule, key)
            described[key] = str(value) if isinstance(value, os.PathLike) else value
    return described


def reference_images(datamodule: Any, split: str = "train") -> Tensor:
    """The images (M, C, H, W) in [-1, 1] of an in-memory DataModule's ``split`` (un-augmented; see ``split``)."""
    images = datamodule.split(split)[0]
    if images.shape[0] < 2:
        raise ValueError(f"the {split} split has {images.shape[0]} images; FID and KID need at least 2")
    return images


def reference_manifest(images: Tensor, extractor: FeatureExtractor, source: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that decides the reference features of ``images`` under ``extractor``; see the module docstring."""
    return {
        "version": REFERENCE_VERSION,
        "source": dict(source),
        "num_images": int(images.shape[0]),
        "image_shape": list(images.shape[1:]),
        "images_sha256": tensor_digest([images.detach().float()]),
        "features": extractor.fingerprint,
        "num_features": int(extractor.num_features),
    }


def fingerprint(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


class ReferenceCache:
    """Reference features on disk, one file per fingerprint (see the module docstring)."""

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        self.dir = Path(cache_dir).expanduser() if cache_dir else cache_root() / "reference"

    def path(self, manifest: Mapping[str, Any]) -> Path:
        return self.dir / f"{fingerprint(manifest)}.pt"

    def load(self, manifest: Mapping[str, Any]) -> Tensor | None:
        """The cached features (M, d) for ``manifest``; None if absent, unreadable or written for another manifest."""
        path = self.path(manifest)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
            log.warning("reference cache %s is unreadable (%s): computing it again", path, err)
            return None
        if entry.get("manifest") != dict(manifest):
            log.warning("reference cache %s was written for another manifest: computing it again", path)
            return None
        return entry["features"]

    def save(self, manifest: Mapping[str, Any], features: Tensor) -> Path:
        """Write the features (M, d) of ``manifest`` (stored as float32, the extractors' own precision)."""
        path = self.path(manifest)
        entry = {"manifest": dict(manifest), "features": features.float().contiguous()}
        atomic_write(path, lambda f: torch.save(entry, f))
        text = json.dumps(dict(manifest), indent=2, sort_keys=True).encode()
        atomic_write(path.with_suffix(".json"), lambda f: f.write(text))
        return path


def reference_features(
    images: Tensor,
    extractor: FeatureExtractor,
    source: Mapping[str, Any],
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> Tensor:
    """phi(real images (M, C, H, W)) -> (M, d) float64: cached if the manifest matches, else computed and cached.

    ``source`` describes where the images come from (:func:`dataset_description` plus the split).
    """
    cache, manifest = ReferenceCache(cache_dir), reference_manifest(images, extractor, source)
    cached = cache.load(manifest)
    if cached is not None:
        log.info("reference features: %s (cached)", cache.path(manifest))
        return cached.double()
    features = extract_features(extractor, images, batch_size)
    path = cache.save(manifest, features)
    log.info("reference features: %s (%d images, computed)", path, images.shape[0])
    return features
