"""The Gaussian noise of the forward process and the samplers: iid, or shaped to the data.

Shaped noise (non-isotropic Gaussian diffusion; PriorGrad, Lee et al. 2022; Voleti et al. 2022) draws
eps = A z, z ~ N(0, I), with covariance C = A A^T over the flattened image (C, H, W), flattened in
that order (n = C H W). The forward process is x_t = sqrt(abar_t) (x0 - mu) + sqrt(1 - abar_t) A z,
the network predicts the white z, and in whitened coordinates y = A^{-1} (x - mu) everything is
standard DDPM: samplers run unchanged on y with the denoiser y -> z_theta(A y, t), and x = A y + mu.

| code              | math                                        |
|-------------------|---------------------------------------------|
| ``color(z)``      | A z                                         |
| ``whiten(x)``     | A^{-1} x                                    |
| ``mean``          | mu (zeros unless ``center``)                |
| ``to_data(y0)``   | A y0 + mu                                   |
| ``from_data(x0)`` | A^{-1} (x0 - mu)                            |
| ``covariance()``  | C = A A^T, dense (n, n), float64            |
| ``trace()``       | tr C, without forming C                     |
| ``log_abs_det()`` | log abs det A                               |

Every fitted A is the symmetric square root V Lambda^{1/2} V^T of an eigendecomposition C = V Lambda V^T
(never a Cholesky factor, which fails on the near-singular covariances of real images). Statistics
are fitted in float64 and the linear maps run in float64, returning the caller's dtype.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from difflab.errors import ConfigError
from difflab.noise.statistics import DenseScatter, NystromScatter, SpectralScatter, StreamingMoments


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    dims = tuple(int(s) for s in shape)
    if len(dims) != 3 or min(dims) < 1:
        raise ConfigError(f"a noise model needs the sample shape (C, H, W) of positive ints, got {tuple(shape)}")
    return dims  # type: ignore[return-value]


class ShapedNoise(nn.Module):
    """Noise eps = A z with covariance C = A A^T over images of ``shape`` (C, H, W); subclasses define A.

    Fitted statistics are persistent float64 buffers whose shapes depend only on the constructor
    arguments, so a fresh instance loads a checkpoint's ``state_dict`` without refitting.
    """

    name: ClassVar[str]
    """The option of the ``noise`` config group (conf/noise/<name>.yaml)."""
    isotropic: ClassVar[bool] = False
    """True only for iid noise, C = I."""
    has_statistics: ClassVar[bool] = False
    """Whether C itself is fitted to data (else only the mean is, with ``center``)."""
    knobs: ClassVar[tuple[str, ...]] = ("center",)
    """Constructor arguments besides ``shape``: saved beside the statistics in :meth:`save`."""

    mean: Tensor
    fit_count: Tensor

    def __init__(self, shape: Sequence[int], center: bool = False) -> None:
        super().__init__()
        self.shape = _check_shape(shape)
        self.dim = math.prod(self.shape)
        self.center = bool(center)
        self.register_buffer("mean", torch.zeros(self.shape, dtype=torch.float64), persistent=self.center)
        self.register_buffer("fit_count", torch.zeros((), dtype=torch.int64), persistent=self.requires_fit)
        self._fitted = not self.requires_fit
        self.register_load_state_dict_post_hook(_recheck_fitted)

    @property
    def option(self) -> str:
        """How the user selected this noise, for messages: ``noise=<name>``."""
        return f"noise={self.name}"

    @property
    def requires_fit(self) -> bool:
        """Whether :meth:`fit` must see training data before the noise can be used."""
        return self.has_statistics or self.center

    @property
    def fitted(self) -> bool:
        """Whether the statistics are there (fitted, or loaded from a checkpoint)."""
        return not self.requires_fit or int(self.fit_count) > 0

    @property
    def is_identity(self) -> bool:
        """x = y: iid noise with no mean, where x0 clipping and pixel-space thresholds stay meaningful."""
        return self.isotropic and not self.center

    def config(self) -> dict[str, object]:
        """The constructor arguments, JSON-serialisable."""
        return {"shape": list(self.shape), **{k: getattr(self, k) for k in self.knobs}}

    # -- the linear maps ---------------------------------------------------------------------------------------

    def _ready(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{self.option} was built for samples of shape {self.shape}, got a batch {tuple(x.shape)}")
        if not self._fitted:  # reads the buffer once (a device sync), not on every call
            if not self.fitted:
                raise RuntimeError(
                    f"{self.option} is not fitted: call fit(batches) on the training data, or load its state"
                )
            self._fitted = True

    def color(self, z: Tensor) -> Tensor:
        """eps = A z for z (B, C, H, W); computed in float64, returned in z's dtype."""
        self._ready(z)
        return self._color(z.double()).to(z.dtype)

    def whiten(self, x: Tensor) -> Tensor:
        """A^{-1} x for x (B, C, H, W) (linear, no mean); computed in float64, returned in x's dtype."""
        self._ready(x)
        return self._whiten(x.double()).to(x.dtype)

    def to_data(self, y0: Tensor) -> Tensor:
        """x = A y + mu: whitened samples (B, C, H, W) back to data space."""
        x = self.color(y0)
        return x + self.mean.to(x.dtype) if self.center else x

    def from_data(self, x0: Tensor) -> Tensor:
        """y = A^{-1} (x - mu): data (B, C, H, W) to whitened coordinates."""
        return self.whiten(x0 - self.mean.to(x0.dtype) if self.center else x0)

    def _color(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def _whiten(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def covariance(self) -> Tensor:
        """The model's C (n, n), float64, built from its parameters (not by calling :meth:`color`)."""
        raise NotImplementedError

    def trace(self) -> Tensor:
        """tr C = E ||A z||^2 (float64 scalar), from the parameters without forming C."""
        raise NotImplementedError

    def log_abs_det(self) -> Tensor:
        """log abs det A (float64 scalar): the change of volume between x and y, for likelihoods in x-space."""
        raise NotImplementedError

    # -- fitting -----------------------------------------------------------------------------------------------

    def check_num_samples(self, num_samples: int) -> None:
        """Refuse a fit on too few samples (ConfigError), so a caller can check before any training starts."""
        if self.requires_fit and num_samples < 2:
            raise ConfigError(f"{self.option} is fitted to the training data and needs >= 2 samples, got {num_samples}")

    def fit(self, batches: Iterable[Tensor]) -> ShapedNoise:
        """Fit mu (with ``center``) and C's statistics on image batches (B, C, H, W), in one float64 pass; returns self.

        A pure function of the batches: the same images in the same batches give bit-identical
        statistics (fit on one process, then broadcast the buffers). A noise with nothing to fit
        returns at once without reading ``batches``.
        """
        if not self.requires_fit:
            return self
        device = self.mean.device
        scatter = self._new_scatter(device) if self.has_statistics else None
        moments = StreamingMoments(None if scatter is None else scatter.absorb)
        for x in batches:
            if tuple(x.shape[1:]) != self.shape:
                raise ConfigError(
                    f"{self.option} was built for images of shape {self.shape}, the data gives {tuple(x.shape[1:])}"
                )
            moments.update(self._features(x.detach().to(device=device, dtype=torch.float64)))
        self.check_num_samples(moments.count)
        with torch.no_grad():
            if self.center:
                self.mean.copy_(self._pixels(moments.mean))
            if scatter is not None:
                self._set_statistics(scatter, moments.count)
            self.fit_count.fill_(moments.count)
        self._fitted = True
        return self

    def _features(self, x: Tensor) -> Tensor:
        """The rows whose scatter the fit accumulates, from images (B, C, H, W)."""
        return x

    def _pixels(self, features: Tensor) -> Tensor:
        """The image (C, H, W) of one feature row (the inverse of :meth:`_features`)."""
        return features

    def _new_scatter(self, device: torch.device) -> DenseScatter | NystromScatter | SpectralScatter:
        raise NotImplementedError

    def _set_statistics(self, scatter: DenseScatter | NystromScatter | SpectralScatter, count: int) -> None:
        raise NotImplementedError

    # -- guards and persistence --------------------------------------------------------------------------------

    def check_clipping(self, option: str, enabled: bool) -> None:
        """Refuse x0 clipping / dynamic thresholding (config key ``option``) unless x-space is y-space (plain iid)."""
        if enabled and not self.is_identity:
            what = f"{self.option} with noise.center=true" if self.isotropic else self.option
            raise ConfigError(
                f"{option} cannot be used with {what}: samplers then run on whitened y = A^-1 (x - mu), where "
                f"a [-1, 1] clip of x0 has no meaning; set {option}=false, or use noise=iid"
            )

    def save(self, path: str | Path) -> Path:
        """Write the statistics and constructor arguments to a safetensors file (e.g. <run dir>/noise.safetensors)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"noise": self.name, "config": json.dumps(self.config())})
        return path

    def load(self, path: str | Path) -> ShapedNoise:
        """Load statistics saved by :meth:`save` into this instance, refusing a file of another noise or config."""
        name, config = read_metadata(path)
        if name != self.name or config != self.config():
            raise ConfigError(f"{path} holds noise={name} with {config}, not {self.option} with {self.config()}")
        self.load_state_dict({k: v.to(self.mean.device) for k, v in load_file(str(path)).items()})
        return self


def _recheck_fitted(module: ShapedNoise, incompatible_keys: object) -> None:
    """After load_state_dict: the next use reads ``fit_count`` again (a module-level function, so modules pickle)."""
    module._fitted = not module.requires_fit


class IIDNoise(ShapedNoise):
    """eps = z ~ N(0, I), standard DDPM: ``color`` returns z itself, so runs stay bit-identical."""

    name = "iid"
    isotropic = True

    def color(self, z: Tensor) -> Tensor:
        """eps = z: the very tensor (no copy, no cast)."""
        self._ready(z)
        return z

    def whiten(self, x: Tensor) -> Tensor:
        """x itself."""
        self._ready(x)
        return x

    def covariance(self) -> Tensor:
        return torch.eye(self.dim, dtype=torch.float64, device=self.mean.device)

    def trace(self) -> Tensor:
        return torch.tensor(float(self.dim), dtype=torch.float64, device=self.mean.device)

    def log_abs_det(self) -> Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.mean.device)


class OffsetNoise(ShapedNoise):
    """Offset noise in its exact linear form: C = I + c^2 1 1^T per channel, A its symmetric square root.

    With P the per-channel spatial mean (a projection), A = I + a P, a = sqrt(1 + c^2 H W) - 1, and
    A^{-1} = I + b P, b = 1 / sqrt(1 + c^2 H W) - 1: the same distribution as z + c w, w ~ N(0, 1) per
    channel (Guttenberg 2023), but a function of z alone, as whitening needs. No fit, O(n) per sample.
    """

    name = "offset"
    knobs = ("strength", "center")

    def __init__(self, shape: Sequence[int], strength: float = 0.1, center: bool = False) -> None:
        if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 0):
            raise ConfigError(f"noise.strength (offset noise c) must be a finite number >= 0, got {strength!r}")
        super().__init__(shape, center)
        self.strength = float(strength)
        self.gain = math.sqrt(1 + self.strength**2 * self.shape[1] * self.shape[2])  # A's eigenvalue on constants

    def _color(self, z: Tensor) -> Tensor:
        return z + (self.gain - 1) * z.mean((-2, -1), keepdim=True)

    def _whiten(self, x: Tensor) -> Tensor:
        return x + (1 / self.gain - 1) * x.mean((-2, -1), keepdim=True)

    def covariance(self) -> Tensor:
        c, h, w = self.shape
        block = torch.eye(h * w, dtype=torch.float64) + self.strength**2
        return torch.block_diag(*[block] * c).to(self.mean.device)

    def trace(self) -> Tensor:
        return torch.tensor(self.dim * (1 + self.strength**2), dtype=torch.float64, device=self.mean.device)

    def log_abs_det(self) -> Tensor:
        return torch.tensor(self.shape[0] * math.log(self.gain), dtype=torch.float64, device=self.mean.device)


def read_metadata(path: str | Path) -> tuple[str, dict[str, object]]:
    """(noise option name, its config) of a file written by :meth:`ShapedNoise.save`."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise ConfigError(f"cannot read noise statistics {path}: {err}") from err
    if "noise" not in meta or "config" not in meta:
        raise ConfigError(f"{path} is not a difflab noise file (no noise/config metadata)")
    return meta["noise"], json.loads(meta["config"])
