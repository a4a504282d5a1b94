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
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

ScheduleName = Literal["linear", "scaled_linear", "cosine", "sigmoid"]


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


def scaled_linear_betas(num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """sqrt(beta_t) linear from sqrt(beta_start) to sqrt(beta_end) (Rombach et al. 2022, Stable Diffusion); float64, (T,)."""
    _check_num_timesteps(num_timesteps)
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(
            f"scaled_linear schedule needs 0 < beta_start < beta_end < 1, got beta_start={beta_start}, "
            f"beta_end={beta_end}"
        )
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def sigmoid_betas(
    num_timesteps: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> Tensor:
    """abar(s) = (sigmoid(end/tau) - sigmoid(((end - start) s + start)/tau)) / (sigmoid(end/tau) - sigmoid(start/tau)).

    Chen 2023 ("On the importance of noise scheduling", Algorithm 1) at s = (t+1)/T, so abar(0) = 1;
    beta_t = 1 - abar_t / abar_{t-1}, clipped at ``max_beta``. float64, shape (T,).
    """
    _check_num_timesteps(num_timesteps)
    if not start < end:
        raise ValueError(f"sigmoid schedule needs start < end, got start={start}, end={end}")
    if tau <= 0.0:
        raise ValueError(f"sigmoid schedule needs a temperature tau > 0, got tau={tau}")
    if not 0.0 < max_beta <= 1.0:
        raise ValueError(f"sigmoid schedule needs 0 < max_beta <= 1, got max_beta={max_beta}")
    s = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64)), torch.sigmoid(
        torch.tensor(end / tau, dtype=torch.float64)
    )
    abar = (v_end - torch.sigmoid(((end - start) * s + start) / tau)) / (v_end - v_start)
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(abar) so that abar_{T-1} = 0 and abar_0 is kept (Lin et al. 2023, Algorithm 1); float64.

    sqrt(abar)' = (sqrt(abar) - sqrt(abar_{T-1})) sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_{T-1})): a linear map of
    sqrt(abar), so beta_{T-1} = 1 and the last step is pure noise (SNR 0). Needs a model that can predict at SNR 0
    (objective v or x0; eps is undefined there).
    """
    sqrt_abar = torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    abar = ((sqrt_abar - last) * first / (first - last)) ** 2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


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


def eps_from_x0(x_t: Tensor, x0: Tensor, abar_t: Tensor) -> Tensor:
    """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) (eq. 4 solved for eps)."""
    return _as((1 - abar_t).rsqrt(), x_t) * x_t - _as((abar_t / (1 - abar_t)).sqrt(), x_t) * x0


def v_from_x0_eps(x0: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, section 4)."""
    return _as(abar_t.sqrt(), eps) * eps - _as((1 - abar_t).sqrt(), x0) * x0


def x0_from_v(x_t: Tensor, v: Tensor, abar_t: Tensor) -> Tensor:
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022)."""
    return _as(abar_t.sqrt(), x_t) * x_t - _as((1 - abar_t).sqrt(), v) * v


def eps_from_v(x_t: Tensor, v: Tensor, abar_t: Tensor) -> Tensor:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v (Salimans & Ho 2022)."""
    return _as((1 - abar_t).sqrt(), x_t) * x_t + _as(abar_t.sqrt(), v) * v


def snr(abar_t: Tensor) -> Tensor:
    """SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021), float64; 0 where abar_t = 0 (zero terminal SNR)."""
    return abar_t / (1 - abar_t)


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


def step_variances(alphas_cumprod: Tensor, pairs: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """(beta, beta~, beta~ clipped) of every step t -> t' of ``pairs``, float64, shape (S,).

    beta = 1 - abar_t / abar_{t'}, beta~ = (1 - abar_{t'}) / (1 - abar_t) beta (eq. 7). beta~ is 0 on
    the step to t' = -1; the clipped copy takes the step above's there, as improved-diffusion's
    ``posterior_log_variance_clipped`` does, so a log variance stays finite there. ``pairs`` descend
    and end at t' = -1 (:func:`difflab.samplers.step_pairs`).
    """
    t = torch.tensor([p[0] for p in pairs], device=alphas_cumprod.device)
    t_prev = torch.tensor([p[1] for p in pairs], device=alphas_cumprod.device)
    abar_t = alphas_cumprod[t]
    abar_prev = torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0)], torch.ones_like(abar_t))
    beta = 1 - abar_t / abar_prev
    beta_tilde = (1 - abar_prev) / (1 - abar_t) * beta
    clipped = beta_tilde.clone()
    clipped[t_prev < 0] = beta_tilde[-2] if len(pairs) > 1 else beta[-1]
    return beta, beta_tilde, clipped


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

    def __init__(self, betas: Tensor, zero_terminal_snr: bool = False) -> None:
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor with T >= 2 entries, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(
                f"every beta must lie in (0, 1], got min {betas.min().item():.3g}, max {betas.max().item():.3g}"
            )
        if bool((betas[:-1] == 1).any()):
            raise ValueError("only the last beta may be 1 (zero terminal SNR): abar would be 0 before t = T-1")
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, dim=0), persistent=False)

    @classmethod
    def linear(
        cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, zero_terminal_snr: bool = False
    ) -> NoiseSchedule:
        """The linear schedule of Ho et al. 2020."""
        return cls(linear_betas(num_timesteps, beta_start, beta_end), zero_terminal_snr)

    @classmethod
    def scaled_linear(
        cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ) -> NoiseSchedule:
        """The scaled-linear schedule of Stable Diffusion (latent diffusion)."""
        return cls(scaled_linear_betas(num_timesteps, beta_start, beta_end), zero_terminal_snr)

    @classmethod
    def cosine(
        cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999, zero_terminal_snr: bool = False
    ) -> NoiseSchedule:
        """The cosine schedule of Nichol & Dhariwal 2021."""
        return cls(cosine_betas(num_timesteps, s, max_beta), zero_terminal_snr)

    @classmethod
    def sigmoid(
        cls, num_timesteps: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
        max_beta: float = 0.999, zero_terminal_snr: bool = False,
    ) -> NoiseSchedule:
        """The sigmoid schedule of Chen 2023 (Algorithm 1)."""
        return cls(sigmoid_betas(num_timesteps, start, end, tau, max_beta), zero_terminal_snr)

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether abar_{T-1} = 0: the last step is pure noise and eps cannot be predicted there."""
        return bool(self.alphas_cumprod[-1] == 0)

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
