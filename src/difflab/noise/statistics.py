"""Statistics of image data for shaped noise: spectrum summaries and knobs, the DCT basis, streaming scatter (pure torch).

Written here because torch has no streaming covariance and no DCT.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from difflab.errors import ConfigError

Scale = Literal["data", "unit_trace", "unit_max"]
SCALES = ("data", "unit_trace", "unit_max")



def participation_ratio(eigenvalues: Tensor) -> float:
    """PR = (sum lambda)^2 / sum lambda^2 of a spectrum (negatives clipped): n for white noise, 1 for rank one."""
    lam = eigenvalues.double().clamp(min=0)
    return float(lam.sum() ** 2 / lam.square().sum())


def effective_rank(eigenvalues: Tensor) -> float:
    """exp(H(p)), p = lambda / sum lambda: the exponential of the spectral entropy (Roy & Vetterli 2007)."""
    lam = eigenvalues.double().clamp(min=0)
    p = lam / lam.sum()
    p = p[p > 0]
    return math.exp(-float((p * p.log()).sum()))


def shape_spectrum(
    eigenvalues: Tensor,
    floor: float,
    shrinkage: float,
    power: float,
    scale: Scale,
    multiplicity: Tensor | None = None,
) -> Tensor:
    """The noise spectrum from the data's: lambda' = k ((1 - s) max(lambda, f m) + s m')^p, float64.

    Negatives are clipped to 0; f = ``floor`` relative to the mean data eigenvalue m = tr(Sigma) / n;
    ``shrinkage`` s pulls toward the mean m' of the floored spectrum (toward iid); ``power`` p = 0 gives
    iid, 1 the data's shape; k sets the trace: tr(Sigma) for ``scale="data"``, n for ``"unit_trace"``, or the
    largest eigenvalue to 1 for ``"unit_max"`` (iid's noise variance: the data's strongest direction is noised at
    iid's rate, every weaker one at the same SNR).
    ``multiplicity`` (same shape) counts how often each eigenvalue repeats (low-rank's complement).
    """
    lam = eigenvalues.double().clamp(min=0)
    weight = torch.ones_like(lam) if multiplicity is None else multiplicity.double()
    n, data_trace = weight.sum(), (weight * lam).sum()
    if not data_trace > 0:
        raise ConfigError("the training data has zero variance: a noise shaped like its covariance does not exist")
    lam = lam.clamp(min=floor * float(data_trace / n))
    lam = (1 - shrinkage) * lam + shrinkage * (weight * lam).sum() / n
    lam = lam**power
    if scale == "unit_max":
        return lam / lam.max()
    target = data_trace if scale == "data" else n
    return lam * (target / (weight * lam).sum())


def dct_matrix(size: int) -> Tensor:
    """The orthonormal DCT-II matrix D (size, size), float64: X = D x, D[k, i] = c_k cos(pi (2 i + 1) k / (2 size)).

    Written out because torch.fft has no DCT; it equals scipy.fft.dct(eye, norm="ortho", axis=0).
    """
    k = torch.arange(size, dtype=torch.float64)[:, None]
    i = torch.arange(size, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * size)) * math.sqrt(2.0 / size)
    d[0] /= math.sqrt(2.0)
    return d




class StreamingMoments:
    """Count, mean and centred scatter sum_i (x_i - mean)(x_i - mean)^T of feature rows (B, ...), batch by batch.

    Batches merge as in Chan et al. 1979: the scatter of the union is that of each part plus
    n_a n_b / n (mean_b - mean_a)(...)^T, so each batch hands ``absorb`` its centred rows plus one
    correction row sqrt(n_a n_b / n) (mean_b - mean_a); any sum of outer products of those rows is
    then exact. ``absorb=None`` keeps the mean only.
    """

    def __init__(self, absorb: Callable[[Tensor], None] | None = None) -> None:
        self.absorb = absorb
        self.count = 0
        self.mean: Tensor | None = None

    def update(self, rows: Tensor) -> None:
        """Add rows (B, ...) in float64."""
        b = rows.shape[0]
        batch_mean = rows.mean(0)
        n = self.count + b
        if self.absorb is not None:
            centred = rows - batch_mean
            if self.count:
                correction = math.sqrt(self.count * b / n) * (batch_mean - self.mean)
                centred = torch.cat([centred, correction[None]])
            self.absorb(centred)
        self.mean = batch_mean if self.mean is None else self.mean + (batch_mean - self.mean) * (b / n)
        self.count = n


class DenseScatter:
    """The exact scatter matrix sum r r^T (n, n) of absorbed rows (B, n), float64."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.matrix = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def absorb(self, rows: Tensor) -> None:
        self.matrix.addmm_(rows.T, rows)

    def top(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """(top-k eigenvalues descending (k,), eigenvectors (n, k), trace) of the scatter."""
        lam, vec = torch.linalg.eigh(self.matrix)
        return lam.flip(0)[:k], vec.flip(1)[:, :k], self.matrix.trace()


class NystromScatter:
    """A one-pass Nystrom sketch Y = S Omega (n, ell) of the scatter S (Tropp, Yurtsever, Udell & Cevher 2017, Alg. 3).

    Omega is an orthonormalised Gaussian from a fixed seed, so a fit stays a function of the data
    alone. top-k eigenpairs come from S ~ Y_nu (Omega^T Y_nu)^{-1} Y_nu^T with Y_nu = Y + nu Omega, nu a
    tiny shift for stability (the Cholesky factor there is of the small ell x ell core, not of C); the
    trace is kept exactly. Memory and cost O(n ell) per row. Used by the low-rank noise where an (n, n)
    scatter would not fit; it underestimates the k-th eigenvalue when the spectrum decays slowly.
    """

    def __init__(self, dim: int, ell: int, device: torch.device) -> None:
        gaussian = torch.randn(dim, ell, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.test_matrix = torch.linalg.qr(gaussian)[0].to(device)
        self.sketch = torch.zeros(dim, ell, dtype=torch.float64, device=device)
        self.trace = torch.zeros((), dtype=torch.float64, device=device)

    def absorb(self, rows: Tensor) -> None:
        self.sketch.addmm_(rows.T, rows @ self.test_matrix)
        self.trace += rows.square().sum()

    def top(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """(top-k eigenvalues descending (k,), eigenvectors (n, k), exact trace) of the sketched scatter."""
        omega, y = self.test_matrix, self.sketch
        nu = math.sqrt(y.shape[0]) * torch.finfo(torch.float64).eps * torch.linalg.matrix_norm(y)
        y = y + nu * omega
        core = omega.T @ y
        factor = torch.linalg.cholesky((core + core.T) / 2)
        u, sigma, _ = torch.linalg.svd(torch.linalg.solve_triangular(factor, y.T, upper=False).T, full_matrices=False)
        return (sigma[:k].square() - nu).clamp(min=0), u[:, :k], self.trace


# ---------------------------------------------------------------------------------------------------------------
# Noise models


class SpectralScatter:
    """Per-frequency colour scatter sum r_c(f) r_d(f) (C, C, H, W) of absorbed DCT rows (B, C, H, W), float64."""

    def __init__(self, shape: tuple[int, int, int], device: torch.device) -> None:
        c, h, w = shape
        self.matrix = torch.zeros(c, c, h, w, dtype=torch.float64, device=device)

    def absorb(self, rows: Tensor) -> None:
        # per colour channel c: sum_b r_c r_d, (C, H, W); memory of one batch (an einsum here ran 100x slower on CPU)
        self.matrix += torch.stack([(rows[:, c : c + 1] * rows).sum(0) for c in range(rows.shape[1])])
