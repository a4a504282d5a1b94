"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), on any respaced grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from torch import Tensor

from difflab.samplers.base import Sampler
from difflab.schedule import eps_mean

Variance = Literal["beta_tilde", "beta"]


def ddpm_step(
    x_t: Tensor, eps: Tensor, abar_t: Tensor, abar_prev: Tensor, z: Tensor | None, variance: Variance = "beta_tilde"
) -> Tensor:
    """x_{t'} = mu_theta(x_t, t) + sigma z with sigma^2 = beta~ or beta (Algorithm 2; eq. 11).

    beta = 1 - abar_t / abar_{t'} is the respaced beta. ``z`` is None on the last step (no noise).
    """
    mean = eps_mean(x_t, eps, abar_t, abar_prev)
    if z is None:
        return mean
    beta = 1 - abar_t / abar_prev
    var = beta if variance == "beta" else (1 - abar_prev) / (1 - abar_t) * beta
    return mean + var.sqrt() * z


@dataclass
class DDPM(Sampler):
    """Ancestral sampling; ``variance`` picks sigma_t^2 = beta~_t (default) or beta_t."""

    variance: Variance = "beta_tilde"
    stochastic = True

    def __post_init__(self) -> None:
        if self.variance not in get_args(Variance):
            raise ValueError(f"unknown DDPM variance {self.variance!r}; allowed: {', '.join(get_args(Variance))}")

    def step(self, x_t: Tensor, eps: Tensor, abar_t: Tensor, abar_prev: Tensor, z: Tensor | None) -> Tensor:
        return ddpm_step(x_t, eps, abar_t, abar_prev, z, self.variance)
