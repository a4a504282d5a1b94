"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) on any respaced grid, with fixed or learned variance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from difflab.objectives import Prediction
from difflab.samplers.base import PairSampler
from difflab.schedule import posterior_mean_variance, step_variances

Variance = Literal["auto", "beta_tilde", "beta", "learned"]


def ddpm_step(
    x_t: Tensor, x0: Tensor, abar_t: Tensor, abar_prev: Tensor, z: Tensor | None, variance: Tensor | None
) -> Tensor:
    """x_{t'} = mu~(x_t, x0_hat) + sigma z (Algorithm 2): the posterior mean (eq. 7) at the model's x0_hat.

    For an eps model this is eq. 11's mu_theta. ``variance`` is sigma^2 (float64, broadcastable);
    ``z`` is None on the last step (no noise, and then ``variance`` is not needed).
    """
    mean, _ = posterior_mean_variance(x0, x_t, abar_t, abar_prev)
    return mean if z is None else mean + variance.sqrt().to(mean.dtype) * z


def learned_variance(frac: Tensor, beta: Tensor, beta_tilde_clipped: Tensor) -> Tensor:
    """Sigma = exp(nu log beta + (1 - nu) log beta~) (Nichol & Dhariwal 2021, eq. 15); nu = ``frac`` (B, ...)."""
    return torch.exp(frac * beta.log().to(frac.dtype) + (1 - frac) * beta_tilde_clipped.log().to(frac.dtype))


@dataclass
class DDPM(PairSampler):
    """Ancestral sampling. ``variance``: sigma_t^2 = beta~_t (``beta_tilde``), beta_t (``beta``), the model's
    learned interpolation (``learned``), or ``auto``: learned when the model learns it, else beta~.

    As in improved-diffusion, ``beta`` takes beta~ of the step above on the last step (t' = -1), where
    beta would be a far too wide decoder; sampling adds no noise there either way.
    """

    variance: Variance = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variance not in get_args(Variance):
            raise ValueError(f"unknown DDPM variance {self.variance!r}; allowed: {', '.join(get_args(Variance))}")

    @property
    def stochastic(self) -> bool:
        return True

    def _learned(self, pred: Prediction) -> bool:
        if self.variance == "learned" and pred.variance_frac is None:
            raise ValueError("DDPM variance=learned needs a model trained with a learned variance (loss=hybrid)")
        return self.variance == "learned" or (self.variance == "auto" and pred.variance_frac is not None)

    def sigma2(self, pred: Prediction, beta: Tensor, beta_tilde: Tensor, beta_tilde_clipped: Tensor) -> Tensor:
        """sigma^2 of a step (float64 beta, beta~ of :func:`~difflab.schedule.step_variances`, broadcastable)."""
        if self._learned(pred):
            return learned_variance(pred.variance_frac, beta, beta_tilde_clipped)
        return torch.where(beta_tilde == 0, beta_tilde_clipped, beta) if self.variance == "beta" else beta_tilde

    def log_sigma2(self, pred: Prediction, beta: Tensor, beta_tilde: Tensor, beta_tilde_clipped: Tensor) -> Tensor:
        """log sigma^2 for the likelihood, finite on the last step (beta~ clipped there, as improved-diffusion)."""
        if self.variance == "beta_tilde" or (self.variance == "auto" and pred.variance_frac is None):
            return beta_tilde_clipped.log()
        return self.sigma2(pred, beta, beta_tilde, beta_tilde_clipped).log()

    def rule(self, alphas_cumprod: Tensor, pairs: list[tuple[int, int]]) -> Callable[..., Tensor]:
        variances = step_variances(alphas_cumprod, pairs)

        def step(i: int, x_t: Tensor, pred: Prediction, abar_t: Tensor, abar_prev: Tensor, z: Tensor | None) -> Tensor:
            sigma2 = None if z is None else self.sigma2(pred, *(v[i] for v in variances))
            return ddpm_step(x_t, pred.x0, abar_t, abar_prev, z, sigma2)

        return step

    def mean_shift_as_x0(self, alphas_cumprod: Tensor) -> Callable[[Tensor, Prediction], Tensor]:
        """k(t, pred) = Sigma / c_x0 of the step from each t (B,) on this sampler's grid.

        The step's mean is c_x0 x0_hat + c_xt x_t (eq. 7), so moving x0_hat by k d moves the mean by
        Sigma d: classifier guidance's DDPM form (Dhariwal & Nichol 2021, Algorithm 1, d = s grad log p)
        with the Sigma this sampler steps with. Returns (B, 1, 1, 1), or (B, C, H, W) for a learned Sigma.
        """
        pairs = self.pairs(alphas_cumprod.numel())
        variances = step_variances(alphas_cumprod, pairs)
        abar_prev = torch.stack([alphas_cumprod[p] if p >= 0 else alphas_cumprod.new_ones(()) for _, p in pairs])
        c_x0 = abar_prev.sqrt() * variances[0] / (1 - alphas_cumprod[[t for t, _ in pairs]])
        index = torch.full((alphas_cumprod.numel(),), -1, dtype=torch.long, device=alphas_cumprod.device)
        index[[t for t, _ in pairs]] = torch.arange(len(pairs), device=index.device)

        def factor(t: Tensor, pred: Prediction) -> Tensor:
            i = index[t.long()]
            shape = (-1, *([1] * (pred.x_t.ndim - 1)))
            sigma2 = self.sigma2(pred, *(v[i].view(shape) for v in variances))
            return (sigma2 / c_x0[i].view(shape)).to(pred.x_t.dtype)

        return factor
