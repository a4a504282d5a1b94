"""DDIM sampling (Song et al. 2021), eta = 0 deterministic, eta = 1 DDPM-like."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from difflab.samplers.base import Sampler
from difflab.schedule import x0_from_eps


def ddim_step(x_t: Tensor, eps: Tensor, abar_t: Tensor, abar_prev: Tensor, z: Tensor | None, eta: float = 0.0) -> Tensor:
    """x_{t'} = sqrt(abar_{t'}) x0_hat + sqrt(1 - abar_{t'} - sigma^2) eps_theta + sigma z (eq. 12).

    sigma = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'}) (eq. 16).
    ``z`` may be None when sigma is 0 (eta = 0, or the last step).
    """
    x0 = x0_from_eps(x_t, eps, abar_t)
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
    return x_prev if z is None else x_prev + sigma * z


@dataclass
class DDIM(Sampler):
    """DDIM with stochasticity ``eta`` in [0, 1]."""

    num_steps: int | None = 50
    eta: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"DDIM eta must lie in [0, 1], got eta={self.eta}")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    def step(self, x_t: Tensor, eps: Tensor, abar_t: Tensor, abar_prev: Tensor, z: Tensor | None) -> Tensor:
        return ddim_step(x_t, eps, abar_t, abar_prev, z, self.eta)
