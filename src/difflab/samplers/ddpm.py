"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), on any respaced grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from torch import Tensor

from difflab.samplers.base import Sampler
from difflab.schedule import eps_mean, posterior_coefficients

Variance = Literal["beta_tilde", "beta"]


def ddpm_step(
    x_t: Tensor, eps: Tensor, abar_t: Tensor, abar_prev: Tensor, z: Tensor | None, variance: Variance = "beta_tilde"
) -> Tensor:
    """x_{t'} = mu_theta(x_t, t) + sigma z with sigma^2 = beta~ or beta (Algorithm 2; eq. 11).

    beta = 1 - abar_t / abar_{t'} is the respaced beta. ``z`` is None on the last step (no noise).
    """
    mean = eps_mean(x_t, eps, abar_t, abar_prev)
    return mean if z is None else mean + ddpm_variance(abar_t, abar_prev, variance).sqrt() * z


def ddpm_variance(abar_t: Tensor, abar_prev: Tensor, variance: Variance = "beta_tilde") -> Tensor:
    """sigma^2 of the step t -> t': beta = 1 - abar_t / abar_{t'}, or beta~ (eq. 7) of that step."""
    return 1 - abar_t / abar_prev if variance == "beta" else posterior_coefficients(abar_t, abar_prev)[2]


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
