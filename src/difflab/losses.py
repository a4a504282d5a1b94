"""Training losses and the terms of the variational bound (pure torch).

The bound (Ho et al. 2020, eq. 5; 0-indexed t, so the paper's x_1 is x_{t=0}):
L = L_T + sum_{t=1}^{T-1} L_{t-1} + L_0 with
L_T = KL(q(x_{T-1} | x0) || N(0, I)), L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)) and
L_0 = -log p_theta(x0 | x_{t=0}), a Gaussian discretised to the 256 bins of 8-bit data in [-1, 1].
Every term here is per sample, in bits per dimension (a mean over the non-batch dimensions / ln 2),
as improved-diffusion reports them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.schedule import posterior_mean_variance


def _mean_flat(x: Tensor) -> Tensor:
    """The mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.flatten(1).mean(1)


def simple_loss(output: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """||target - output||^2 of each sample (B,), optionally times ``weight`` (B,); L_simple (Ho et al. 2020, eq. 14)
    is its mean over the batch for target = eps.

    Averaged over the elements of a sample, so its scale does not depend on the image size. ``output``,
    ``target`` (B, ...).
    """
    losses = _mean_flat((target - output).square())
    return losses if weight is None else weight.to(losses.dtype) * losses


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats.

    = 1/2 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1).
    """
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2).square() * torch.exp(-logvar2) - 1)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) of 8-bit data x in [-1, 1] under N(mean, e^(2 log_scale)) integrated over x's bin, elementwise.

    Bins have width 2/255 around the 256 values; the first and last bins extend to -inf and +inf,
    so the probabilities of the 256 bins sum to 1 (Ho et al. 2020, eq. 13). Uses the exact normal
    CDF (torch.special.ndtr; improved-diffusion uses a tanh approximation).
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(x; mean, e^log_var) elementwise, in nats: the decoder for continuous data (latents)."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean).square() * torch.exp(-log_var))


def prior_bpd(x0: Tensor, abar_last: Tensor) -> Tensor:
    """L_T = KL(q(x_{T-1} | x0) || N(0, I)) in bits/dim, (B,); q = N(sqrt(abar) x0, 1 - abar), abar = abar_{T-1}."""
    mean = abar_last.sqrt().to(x0.dtype) * x0
    log_var = torch.log(1 - abar_last).to(x0.dtype).expand_as(x0)
    return _mean_flat(normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0))) / math.log(2)


def vlb_term(
    x0: Tensor,
    x_t: Tensor,
    x0_pred: Tensor,
    abar_t: Tensor,
    abar_prev: Tensor,
    model_log_var: Tensor,
    true_log_var: Tensor,
    decoder: bool | Tensor,
    discrete: bool = True,
) -> Tensor:
    """L_{t-1} (or L_0 where ``decoder``) in bits/dim for each sample, (B,).

    The model's p(x_{t'} | x_t) = N(mu~(x_t, x0_pred), e^model_log_var) and the true posterior
    q(x_{t'} | x_t, x0) = N(mu~(x_t, x0), e^true_log_var) (eq. 6-7, ``true_log_var`` clipped finite at t' = -1).
    Where ``decoder`` (B,) bool (t = 0), the term is -log p(x0 | x_t) instead: discretised over 256 bins
    (``discrete``, pixel data) or a Gaussian density (continuous data such as latents). abar_t,
    abar_prev, the log variances broadcast to x0.
    """
    true_mean, _ = posterior_mean_variance(x0, x_t, abar_t, abar_prev)
    model_mean, _ = posterior_mean_variance(x0_pred, x_t, abar_t, abar_prev)
    model_log_var, true_log_var = model_log_var.to(x0.dtype), true_log_var.to(x0.dtype)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2)
    if discrete:
        log_p = discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    else:
        log_p = gaussian_log_likelihood(x0, model_mean, model_log_var)
    nll = -_mean_flat(log_p) / math.log(2)
    return torch.where(torch.as_tensor(decoder, device=x0.device), nll, kl)
