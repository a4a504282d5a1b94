"""The exact denoiser of Gaussian data under shaped noise: the reference a learned denoiser is measured against.

For data x0 ~ N(m, Sigma) and the forward process x_t = sqrt(abar) (x0 - mu) + sqrt(1 - abar) A z (docs/noise.md),
x_t is Gaussian with covariance M = abar Sigma + (1 - abar) C, C = A A^T, and the posterior mean of z is linear:
z_hat = sqrt(1 - abar) A^T M^-1 (x_t - sqrt(abar) (m - mu)). On any data of mean m and covariance Sigma it is the
best linear denoiser, and its error is the posterior covariance whatever the data's distribution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from difflab.noise.shaped import ShapedNoise


def dense_root(noise: ShapedNoise) -> Tensor:
    """A (n, n), float64, by colouring the identity basis: column j is A e_j."""
    n = noise.dim
    return noise.color(torch.eye(n, dtype=torch.float64, device=noise.mean.device).view(n, *noise.shape)).view(n, n).T


def exact_denoiser_matrix(sigma: Tensor, a: Tensor, c: Tensor, abar: Tensor) -> Tensor:
    """K = sqrt(1 - abar) A^T (abar Sigma + (1 - abar) C)^-1 (n, n): z_hat = K (x_t - sqrt(abar) (m - mu))."""
    return (1 - abar).sqrt() * torch.linalg.solve(abar * sigma + (1 - abar) * c, a).T


def exact_denoiser(sigma: Tensor, data_mean: Tensor, noise: ShapedNoise, abar: Tensor) -> Callable[[Tensor], Tensor]:
    """x_t (B, C, H, W) -> E[z | x_t] for x0 ~ N(data_mean (C, H, W), sigma (n, n)), float64."""
    k = exact_denoiser_matrix(sigma, dense_root(noise), noise.covariance(), abar)
    shift = abar.sqrt() * (data_mean - noise.mean).flatten()
    return lambda x_t: ((x_t.flatten(1).double() - shift) @ k.T).view(x_t.shape)


def posterior_x0_covariance(sigma: Tensor, c: Tensor, abar: Tensor) -> Tensor:
    """Cov(x0 | x_t) = Sigma - abar Sigma (abar Sigma + (1 - abar) C)^-1 Sigma (n, n): the exact denoiser's x0 error."""
    return sigma - abar * sigma @ torch.linalg.solve(abar * sigma + (1 - abar) * c, sigma)
