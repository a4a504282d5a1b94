"""Exponential moving average of the weights: the EMA training samples with, and the power-function EMAs of
post-hoc EMA (EDM2) with the least-squares fit that reconstructs any other from their snapshots."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


class EMA(nn.Module):
    """theta_ema <- d theta_ema + (1 - d) theta after each optimizer step, d = min(decay, (1 + n) / (10 + n)).

    n counts the updates so far; the first update copies the weights. The warm-up (as in
    TensorFlow's ExponentialMovingAverage with num_updates) lets short runs benefit: early on the
    average forgets the random initialisation quickly.

    Written by hand rather than on ``torch.optim.swa_utils.AveragedModel``: its update regroups
    the tensors and reads its device-side counter every step, 4.7 ms per update against 0.8 ms
    for this single ``torch._foreach_lerp_`` (1.1M-parameter UNet, 2 CPU threads; diffusers'
    EMAModel is slower still; docs/benchmarks.md, training throughput). The count is a Python int saved as extra state,
    so an update never waits on the GPU.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got decay={decay}")
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0

    def current_decay(self, num_updates: int | None = None) -> float:
        """The decay d the next update applies (after ``num_updates`` updates; default: so far)."""
        n = self.num_updates if num_updates is None else num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averaged parameters towards ``model``'s; buffers (constants in a denoiser) are copied."""
        ema, new = list(self.module.parameters()), [p.detach() for p in model.parameters()]
        if self.num_updates == 0:
            torch._foreach_copy_(ema, new)
        else:
            torch._foreach_lerp_(ema, new, 1.0 - self.current_decay())
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])


# Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2, Sec. 3).
# Time t counts optimizer steps from 1: the average after step t has seen the weights theta_1 .. theta_t.


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))): a power-function profile's width (Eq. 2)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of relative width ``sigma_rel``: the real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma
    + (12 - s^-2) = 0, Eq. 2 solved for gamma (EDM2's ``sigma_rel_to_gamma``)."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}) (gamma > 0), got sigma_rel={sigma_rel}")
    t = sigma_rel**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


MAX_SIGMA_REL = gamma_to_sigma_rel(0.0)
"""sigma_rel of gamma = 0 (the uniform average of all steps so far, 1/sqrt(12)): wider profiles need gamma < 0."""


def power_function_beta(gamma: float, t: int) -> float:
    """beta_gamma(t) = (1 - 1/t)^(gamma + 1), the decay of the update after step t >= 1 (Eq. 3); beta(1) = 0."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def p_dot_p(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b>, the integral over tau of two power-function profiles p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),
    0 <= tau <= t, in closed form (EDM2 Appendix C.3, ``p_dot_p``); arguments broadcast, float64."""
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    t_max = np.maximum(t_a, t_b)
    num = (gamma_a + 1) * (gamma_b + 1) * t_ratio**t_exp
    den = (gamma_a + gamma_b + 1) * t_max
    return num / den


def solve_posthoc_coefficients(
    t_i: Sequence[float], gamma_i: Sequence[float], t_r: Sequence[float], gamma_r: Sequence[float]
) -> np.ndarray:
    """x (N, M): the least-squares weights of N stored profiles (t_i, gamma_i) whose sum best matches each of M target
    profiles (t_r, gamma_r): A x = b, A_ij = <p_i, p_j>, b_ir = <p_i, p_r> (EDM2 Appendix C.3, Algorithm 3)."""
    column = lambda x: np.asarray(x, dtype=np.float64).reshape(-1, 1)  # noqa: E731
    row = lambda x: np.asarray(x, dtype=np.float64).reshape(1, -1)  # noqa: E731
    a = p_dot_p(column(t_i), column(gamma_i), row(t_i), row(gamma_i))
    b = p_dot_p(column(t_i), column(gamma_i), row(t_r), row(gamma_r))
    return np.linalg.lstsq(a, b, rcond=None)[0]


class PowerFunctionEMA:
    """Power-function EMAs of a list of tensors, one per gamma: hat_theta_t = beta(t) hat_theta_{t-1} + (1 - beta(t))
    theta_t with beta(t) = (1 - 1/t)^(gamma + 1) (Eq. 3), so hat_theta_t averages theta_1 .. theta_t with weights
    proportional to tau^gamma. Kept in float32, updated with one ``torch._foreach_lerp_`` per gamma."""

    def __init__(self, tensors: Sequence[Tensor], gammas: Sequence[float]) -> None:
        self.gammas = [float(g) for g in gammas]
        self.averages = [[x.detach().float().clone() for x in tensors] for _ in self.gammas]

    @torch.no_grad()
    def update(self, tensors: Sequence[Tensor], t: int) -> None:
        """Average in the tensors after step t (t = 1, 2, ...; t = 1 copies them)."""
        new = [x.detach().float() for x in tensors]
        for gamma, average in zip(self.gammas, self.averages):
            torch._foreach_lerp_(average, new, 1.0 - power_function_beta(gamma, t))
