"""Noise schedules and the closed forms of the DDPM forward process (pure torch).

Notation (Ho et al. 2020; timesteps are 0-indexed as in diffusers, t in {0, ..., T-1}):

| code                    | paper                                   |
|-------------------------|-----------------------------------------|
| ``betas[t]``            | beta_t                                  |
| ``alphas[t]``           | alpha_t = 1 - beta_t                    |
| ``alphas_cumprod[t]``   | abar_t = prod_{s<=t} alpha_s            |
| ``abar_prev``           | abar_{t'} of the step's predecessor t' < t, with abar_{-1} = 1 |

The pair functions (``posterior_mean_variance``, ``eps_mean``) are written for a step
t -> t' between any two grid points, with beta = 1 - abar_t / abar_{t'}. For t' = t - 1 they
are exactly eq. 6-7 and eq. 11; for a respaced grid they are the respaced process of
Nichol & Dhariwal 2021 (section 4). Samplers and :class:`NoiseSchedule` share them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

ScheduleName = Literal["linear", "cosine"]


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """beta_t linear from ``beta_start`` to ``beta_end`` (Ho et al. 2020, section 4); float64, shape (T,)."""
    _check_num_timesteps(num_timesteps)
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(
            f"linear schedule needs 0 < beta_start < beta_end < 1, got beta_start={beta_start}, "
            f"beta_end={beta_end}"
        )
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """beta_t = 1 - f(t+1)/f(t), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), clipped at ``max_beta``.

    Nichol & Dhariwal 2021, eq. 17; so abar_t = f(t+1)/f(0) for 0-indexed t wherever no beta is
    clipped. float64, shape (T,).
    """
    _check_num_timesteps(num_timesteps)
    if s < 0.0:
        raise ValueError(f"cosine schedule needs an offset s >= 0, got s={s}")
    if not 0.0 < max_beta <= 1.0:
        raise ValueError(f"cosine schedule needs 0 < max_beta <= 1, got max_beta={max_beta}")
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def _check_num_timesteps(num_timesteps: int) -> None:
    if int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise ValueError(f"a schedule needs an integer number of timesteps T >= 2, got T={num_timesteps}")


def _as(coef: Tensor, x: Tensor) -> Tensor:
    """A float64 coefficient cast to x's dtype (and device) just before it multiplies x."""
    return coef.to(dtype=x.dtype, device=x.device)


def q_sample_abar(x0: Tensor, abar_t: Tensor, noise: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4); abar_t broadcasts to x0."""
    return _as(abar_t.sqrt(), x0) * x0 + _as((1 - abar_t).sqrt(), x0) * noise


def x0_from_eps(x_t: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (eq. 4 solved for x0; eq. 15)."""
    return _as(abar_t.rsqrt(), x_t) * x_t - _as(((1 - abar_t) / abar_t).sqrt(), x_t) * eps


def posterior_coefficients(abar_t: Tensor, abar_prev: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(c_x0, c_xt, beta~) of q(x_{t'} | x_t, x0) = N(c_x0 x0 + c_xt x_t, beta~) for a step t -> t' (eq. 6-7).

    c_x0 = sqrt(abar_{t'}) beta / (1 - abar_t), c_xt = sqrt(alpha) (1 - abar_{t'}) / (1 - abar_t),
    beta~ = (1 - abar_{t'}) / (1 - abar_t) beta, with alpha = abar_t / abar_{t'} and beta = 1 - alpha.
    """
    alpha = abar_t / abar_prev
    beta = 1 - alpha
    return abar_prev.sqrt() * beta / (1 - abar_t), alpha.sqrt() * (1 - abar_prev) / (1 - abar_t), (1 - abar_prev) / (1 - abar_t) * beta


def posterior_mean_variance(x0: Tensor, x_t: Tensor, abar_t: Tensor, abar_prev: Tensor) -> tuple[Tensor, Tensor]:
    """Mean mu~ (shaped like x_t) and variance beta~ (float64, shaped like abar_t) of q(x_{t'} | x_t, x0)."""
    c_x0, c_xt, variance = posterior_coefficients(abar_t, abar_prev)
    return _as(c_x0, x0) * x0 + _as(c_xt, x_t) * x_t, variance


def eps_mean(x_t: Tensor, eps: Tensor, abar_t: Tensor, abar_prev: Tensor) -> Tensor:
    """mu_theta = (x_t - beta / sqrt(1 - abar_t) eps_theta) / sqrt(alpha) (eq. 11), alpha = abar_t / abar_{t'}."""
    alpha = abar_t / abar_prev
    return _as(alpha.rsqrt(), x_t) * x_t - _as((1 - alpha) / ((1 - abar_t) * alpha).sqrt(), x_t) * eps


class NoiseSchedule(nn.Module):
    """A discrete noise schedule beta_0..beta_{T-1} with the forward-process closed forms.

    ``betas`` and ``alphas_cumprod`` are float64 buffers and every coefficient is computed in
    float64, then cast to the data's dtype: in float32, 1 - abar_t and 1 - abar_t / abar_{t-1}
    lose ~1e-3 of their relative precision at small t (measured in tests/test_schedule.py),
    which the likelihood terms feel. The buffers are not persistent: a schedule rebuilds from
    its config, so a checkpoint never carries a stale copy. (Use "*-mixed" precision, which
    leaves buffers alone, not "bf16-true".)
    """

    betas: Tensor
    alphas_cumprod: Tensor

    def __init__(self, betas: Tensor) -> None:
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor with T >= 2 entries, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(
                f"every beta must lie in (0, 1], got min {betas.min().item():.3g}, max {betas.max().item():.3g}"
            )
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, dim=0), persistent=False)

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """The linear schedule of Ho et al. 2020."""
        return cls(linear_betas(num_timesteps, beta_start, beta_end))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """The cosine schedule of Nichol & Dhariwal 2021."""
        return cls(cosine_betas(num_timesteps, s, max_beta))

    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return self.betas.numel()

    def abar(self, t: Tensor, ndim: int = 1) -> Tensor:
        """abar_t (float64) for integer timesteps t in {-1, ..., T-1} (abar_{-1} = 1), shaped (B,) + (1,) * (ndim - 1)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        abar = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], self.alphas_cumprod.new_ones(()))
        return abar.reshape(abar.shape + (1,) * (ndim - abar.ndim))

    @property
    def posterior_variance(self) -> Tensor:
        """beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t for t = 0..T-1 (eq. 7), float64, beta~_0 = 0."""
        t = torch.arange(self.num_timesteps, device=self.betas.device)
        return posterior_coefficients(self.abar(t), self.abar(t - 1))[2]

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4); x0, noise (B, ...), t (B,)."""
        return q_sample_abar(x0, self.abar(t, x0.ndim), noise)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x0) (eq. 6-7); variance float64, shaped (B, 1, ...)."""
        return posterior_mean_variance(x0, x_t, self.abar(t, x_t.ndim), self.abar(t - 1, x_t.ndim))

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (eq. 15)."""
        return x0_from_eps(x_t, eps, self.abar(t, x_t.ndim))

    def p_mean(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The eps-parameterised reverse mean mu_theta(x_t, t) (eq. 11)."""
        return eps_mean(x_t, eps, self.abar(t, x_t.ndim), self.abar(t - 1, x_t.ndim))
