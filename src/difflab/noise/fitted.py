"""The shaped noises fitted to the data's covariance: dense (``covariance``), low rank plus isotropic (``lowrank``)
and colour PCA x DCT (``spectral``); each spectrum passes through :func:`~difflab.noise.statistics.shape_spectrum`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from difflab.errors import ConfigError
from difflab.noise.shaped import ShapedNoise
from difflab.noise.statistics import (
    SCALES,
    DenseScatter,
    NystromScatter,
    Scale,
    SpectralScatter,
    dct_matrix,
    shape_spectrum,
)

DENSE_MAX_DIM = 4096
"""The largest n a dense covariance takes: its (n, n) eigenbasis is 134 MB in float64 at n = 4096."""
DENSE_MIN_SAMPLES_PER_DIM = 5
"""A dense fit needs >= 5 n samples: below that its small eigenvalues are mostly sampling noise."""


class FittedNoise(ShapedNoise):
    """A noise whose spectrum comes from the data's covariance through :func:`shape_spectrum`'s knobs."""

    has_statistics = True
    knobs = ("floor", "shrinkage", "power", "scale", "center")

    def __init__(
        self,
        shape: Sequence[int],
        floor: float = 1e-2,
        shrinkage: float = 0.0,
        power: float = 1.0,
        scale: Scale = "data",
        center: bool = True,
    ) -> None:
        for knob, value, positive in (("floor", floor, True), ("shrinkage", shrinkage, False), ("power", power, False)):
            if not (isinstance(value, (int, float)) and (value > 0 if positive else value >= 0) and value <= 1):
                raise ConfigError(f"noise.{knob} must lie in {'(0' if positive else '[0'}, 1], got {value!r}")
        if scale not in SCALES:
            raise ConfigError(f"noise.scale must be one of {', '.join(SCALES)}, got {scale!r}")
        super().__init__(shape, center)
        self.floor, self.shrinkage, self.power, self.scale = float(floor), float(shrinkage), float(power), scale

    def _spectrum(self, eigenvalues: Tensor, multiplicity: Tensor | None = None) -> Tensor:
        return shape_spectrum(eigenvalues, self.floor, self.shrinkage, self.power, self.scale, multiplicity)


class CovarianceNoise(FittedNoise):
    """Dense C fitted to the data: C = V Lambda V^T (eigh), A = V Lambda^{1/2} V^T; O(n^2) per sample, n <= 4096."""

    name = "covariance"
    eigenvectors: Tensor
    eigenvalues: Tensor

    def __init__(self, shape: Sequence[int], **spectrum_knobs: object) -> None:
        super().__init__(shape, **spectrum_knobs)  # type: ignore[arg-type]
        if self.dim > DENSE_MAX_DIM:
            raise ConfigError(
                f"noise=covariance is dense and takes at most {DENSE_MAX_DIM} dimensions; samples of shape "
                f"{self.shape} have {self.dim}: use noise=lowrank or noise=spectral, or a lower resolution"
            )
        self.register_buffer("eigenvectors", torch.eye(self.dim, dtype=torch.float64))
        self.register_buffer("eigenvalues", torch.ones(self.dim, dtype=torch.float64))

    def check_num_samples(self, num_samples: int) -> None:
        need = DENSE_MIN_SAMPLES_PER_DIM * self.dim
        if num_samples < need:
            raise ConfigError(
                f"noise=covariance fits a dense {self.dim} x {self.dim} covariance and needs >= "
                f"{DENSE_MIN_SAMPLES_PER_DIM} n = {need} training samples (n = {self.dim} for shape {self.shape}), "
                f"got {num_samples}: use noise=lowrank or noise=spectral, or a lower dataset.resolution"
            )

    def _features(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def _pixels(self, features: Tensor) -> Tensor:
        return features.view(self.shape)

    def _new_scatter(self, device: torch.device) -> DenseScatter:
        return DenseScatter(self.dim, device)

    def _set_statistics(self, scatter: DenseScatter, count: int) -> None:
        lam, vec, _ = scatter.top(self.dim)
        self.eigenvectors.copy_(vec)
        self.eigenvalues.copy_(self._spectrum(lam / (count - 1)))

    def _apply_root(self, x: Tensor, exponent: float) -> Tensor:
        v = self.eigenvectors
        return ((x.flatten(1) @ v) * self.eigenvalues.pow(exponent) @ v.T).view(x.shape)

    def _color(self, z: Tensor) -> Tensor:
        return self._apply_root(z, 0.5)

    def _whiten(self, x: Tensor) -> Tensor:
        return self._apply_root(x, -0.5)

    def covariance(self) -> Tensor:
        return (self.eigenvectors * self.eigenvalues) @ self.eigenvectors.T

    def trace(self) -> Tensor:
        return self.eigenvalues.sum()

    def log_abs_det(self) -> Tensor:
        return 0.5 * self.eigenvalues.log().sum()


class LowRankNoise(FittedNoise):
    """Top-k PCA plus an isotropic floor: C = lambda_c I + V_k (Lambda_k - lambda_c) V_k^T, never formed as (n, n).

    lambda_c is the mean data variance outside the top-k subspace (probabilistic PCA, Tipping & Bishop
    1999), so tr C = tr Sigma before the knobs. A = sqrt(lambda_c) I + V_k (Lambda_k^{1/2} - sqrt(lambda_c)) V_k^T:
    O(n k) per sample. The fit uses the exact (n, n) scatter up to ``max_exact_dim`` dimensions, and
    above it a one-pass Nystrom sketch of ell = 8 k columns (:class:`NystromScatter`).
    """

    name = "lowrank"
    knobs = ("rank", *FittedNoise.knobs, "max_exact_dim")
    basis: Tensor
    eigenvalues: Tensor
    complement: Tensor

    def __init__(
        self, shape: Sequence[int], rank: int = 16, max_exact_dim: int = DENSE_MAX_DIM, **spectrum_knobs: object
    ) -> None:
        super().__init__(shape, **spectrum_knobs)  # type: ignore[arg-type]
        if not (isinstance(rank, int) and 1 <= rank < self.dim):
            raise ConfigError(
                f"noise.rank must be an integer in [1, {self.dim - 1}] for samples of shape {self.shape}, got {rank!r}"
            )
        self.rank, self.max_exact_dim = rank, int(max_exact_dim)
        self.register_buffer("basis", torch.eye(self.dim, rank, dtype=torch.float64))
        self.register_buffer("eigenvalues", torch.ones(rank, dtype=torch.float64))
        self.register_buffer("complement", torch.ones((), dtype=torch.float64))

    def check_num_samples(self, num_samples: int) -> None:
        if num_samples <= self.rank:
            raise ConfigError(
                f"noise=lowrank with noise.rank={self.rank} needs more than {self.rank} training samples, "
                f"got {num_samples}"
            )

    def _features(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def _pixels(self, features: Tensor) -> Tensor:
        return features.view(self.shape)

    def _new_scatter(self, device: torch.device) -> DenseScatter | NystromScatter:
        if self.dim <= self.max_exact_dim:
            return DenseScatter(self.dim, device)
        return NystromScatter(self.dim, min(self.dim, 8 * self.rank), device)

    def _set_statistics(self, scatter: DenseScatter | NystromScatter, count: int) -> None:
        lam, vec, trace = scatter.top(self.rank)
        k, n = self.rank, self.dim
        rest = ((trace - lam.sum()) / (n - k)).clamp(min=0)
        spectrum = self._spectrum(torch.cat([lam, rest[None]]) / (count - 1),
                                  torch.tensor([1.0] * k + [n - k], dtype=torch.float64, device=lam.device))
        self.basis.copy_(vec)
        self.eigenvalues.copy_(spectrum[:k])
        self.complement.copy_(spectrum[k])

    def _apply_root(self, x: Tensor, exponent: float) -> Tensor:
        flat, v = x.flatten(1), self.basis
        gain = self.eigenvalues.pow(exponent) - self.complement.pow(exponent)
        return (self.complement.pow(exponent) * flat + ((flat @ v) * gain) @ v.T).view(x.shape)

    def _color(self, z: Tensor) -> Tensor:
        return self._apply_root(z, 0.5)

    def _whiten(self, x: Tensor) -> Tensor:
        return self._apply_root(x, -0.5)

    def covariance(self) -> Tensor:
        v = self.basis
        eye = torch.eye(self.dim, dtype=torch.float64, device=v.device)
        return self.complement * eye + (v * (self.eigenvalues - self.complement)) @ v.T

    def trace(self) -> Tensor:
        return self.eigenvalues.sum() + (self.dim - self.rank) * self.complement

    def log_abs_det(self) -> Tensor:
        return 0.5 * (self.eigenvalues.log().sum() + (self.dim - self.rank) * self.complement.log())


def _mix_channels(x: Tensor, u: Tensor) -> Tensor:
    """y_k = sum_c u[c, k] x_c for images x (B, C, H, W): the colour transform U^T at every pixel."""
    return (x.movedim(1, -1) @ u).movedim(-1, 1).contiguous()


class SpectralNoise(FittedNoise):
    """Colour PCA x 2-D DCT basis with a diagonal spectrum: C = T^T diag(lambda) T, T = U^T (x) D_H (x) D_W.

    U (C, C) are the eigenvectors of the pixel-averaged colour covariance (1 x 1 for gray) and D the
    orthonormal DCT-II matrices; lambda (C, H, W) is the data's variance of each (colour component,
    frequency) coefficient, through the knobs. Natural images are nearly stationary, so this basis
    nearly diagonalises their covariance: 9 + 3 H W parameters, O(n (H + W)) per sample, any resolution.
    """

    name = "spectral"
    color_basis: Tensor
    variances: Tensor
    dct_h: Tensor
    dct_w: Tensor

    def __init__(self, shape: Sequence[int], **spectrum_knobs: object) -> None:
        super().__init__(shape, **spectrum_knobs)  # type: ignore[arg-type]
        c, h, w = self.shape
        self.register_buffer("color_basis", torch.eye(c, dtype=torch.float64))
        self.register_buffer("variances", torch.ones(self.shape, dtype=torch.float64))
        self.register_buffer("dct_h", dct_matrix(h), persistent=False)
        self.register_buffer("dct_w", dct_matrix(w), persistent=False)

    def _features(self, x: Tensor) -> Tensor:
        """The 2-D DCT of each channel, (B, C, H, W): D_H x D_W^T."""
        return self.dct_h @ x @ self.dct_w.T

    def _pixels(self, features: Tensor) -> Tensor:
        return self.dct_h.T @ features @ self.dct_w

    def _new_scatter(self, device: torch.device) -> SpectralScatter:
        return SpectralScatter(self.shape, device)

    def _set_statistics(self, scatter: SpectralScatter, count: int) -> None:
        cov = scatter.matrix / (count - 1)  # Cov(X_c(f), X_d(f)) for every frequency f
        _, u = torch.linalg.eigh(cov.mean((-2, -1)))  # pixel-averaged colour covariance (Parseval)
        u = u.flip(1)  # first component the largest
        self.color_basis.copy_(u)
        self.variances.copy_(self._spectrum(torch.einsum("ck,cdhw,dk->khw", u, cov, u)))

    def _apply_root(self, x: Tensor, exponent: float) -> Tensor:
        u = self.color_basis
        coeffs = self.dct_h @ _mix_channels(x, u) @ self.dct_w.T  # U^T per pixel, then D_H . D_W^T per channel
        coeffs = coeffs * self.variances.pow(exponent)
        return _mix_channels(self.dct_h.T @ coeffs @ self.dct_w, u.T)

    def _color(self, z: Tensor) -> Tensor:
        return self._apply_root(z, 0.5)

    def _whiten(self, x: Tensor) -> Tensor:
        return self._apply_root(x, -0.5)

    def transform(self) -> Tensor:
        """T = U^T (x) D_H (x) D_W (n, n), orthogonal: the coefficients of a flattened image are T x."""
        return torch.kron(self.color_basis.T.contiguous(), torch.kron(self.dct_h, self.dct_w))

    def covariance(self) -> Tensor:
        t = self.transform()
        return (t.T * self.variances.flatten()) @ t

    def trace(self) -> Tensor:
        return self.variances.sum()  # T is orthogonal

    def log_abs_det(self) -> Tensor:
        return 0.5 * self.variances.log().sum()
