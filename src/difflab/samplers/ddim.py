"""DDIM sampling (Song et al. 2021), eta = 0 deterministic, eta = 1 DDPM-like."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from difflab.objectives import Prediction
from difflab.samplers.base import PairSampler


def ddim_step(
    x0: Tensor, eps: Tensor, abar_t: Tensor, abar_prev: Tensor, z: Tensor | None, eta: float = 0.0
) -> Tensor:
    """x_{t'} = sqrt(abar_{t'}) x0_hat + sqrt(1 - abar_{t'} - sigma^2) eps_hat + sigma z (eq. 12).

    sigma = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'}) (eq. 16). x0_hat and
    eps_hat are the model's, so the step needs no division by sqrt(abar_t) (zero terminal SNR works).
    ``z`` may be None when sigma is 0 (eta = 0, or the last step).
    """
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    x_prev = abar_prev.sqrt().to(x0.dtype) * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt().to(x0.dtype) * eps
    return x_prev if z is None else x_prev + sigma.to(x0.dtype) * z


@dataclass
class DDIM(PairSampler):
    """DDIM with stochasticity ``eta`` in [0, 1]."""

    num_steps: int | None = 50
    eta: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(
                f"sampler.eta must lie in [0, 1], got eta={self.eta}: 0 is deterministic DDIM, 1 DDPM-like"
            )

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def rule(self, alphas_cumprod: Tensor, pairs: list[tuple[int, int]]) -> Callable[..., Tensor]:
        def step(i: int, x_t: Tensor, pred: Prediction, abar_t: Tensor, abar_prev: Tensor, z: Tensor | None) -> Tensor:
            return ddim_step(pred.x0, pred.eps, abar_t, abar_prev, z, self.eta)

        return step
