"""What the network predicts (eps, x0 or v), one set of conversions between them, and the loss weightings (pure torch).

Notation as in :mod:`difflab.schedule`; with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022), each of eps, x0, v follows from
x_t and any one of them. The network's output is read through :class:`Prediction`, so every loss,
sampler and guidance rule works with every objective.

Loss weightings are stated in "x0 units": for a per-sample error e = ||x0 - x0_hat||^2, an eps loss
is SNR e, an x0 loss is e and a v loss is (1 + SNR) e (because eps - eps_hat = -sqrt(SNR) (x0 - x0_hat)
and v - v_hat = -(x0 - x0_hat) / sqrt(1 - abar)). A weighting names the x0-unit weight lambda it
wants; the objective's own loss is multiplied by w = lambda_weighting / lambda_objective:

| weighting | lambda(t) in x0 units | w for objective eps | x0 | v |
|---|---|---|---|---|
| ``uniform`` | the objective's own | 1 | 1 | 1 |
| ``eps`` (L_simple of Ho et al.) | SNR | 1 | SNR | SNR / (1 + SNR) |
| ``x0`` | 1 | 1 / SNR | 1 | 1 / (1 + SNR) |
| ``v`` | 1 + SNR | (1 + SNR) / SNR | 1 + SNR | 1 |
| ``min_snr`` (Hang et al. 2023) | min(SNR, gamma) | min(SNR, gamma) / SNR | min(SNR, gamma) | min(SNR, gamma) / (1 + SNR) |

As gamma grows, min-SNR becomes the ``eps`` weighting: L_simple, whatever the objective.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
from torch import Tensor

from difflab.schedule import eps_from_v, eps_from_x0, snr, v_from_x0_eps, x0_from_eps, x0_from_v

Objective = Literal["eps", "x0", "v"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
Weighting = Literal["uniform", "eps", "x0", "v", "min_snr"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
Space = Literal["white", "data"]
SPACES: tuple[str, ...] = get_args(Space)
"""Coordinates of shaped noise (eps = A z): ``white`` y = A^-1 (x - mu), where the process is standard DDPM, or
``data`` x - mu, the image's own; the same for iid noise."""


def check_space(key: str, space: str) -> Space:
    """``space`` if it is one of white, data; else a ValueError naming ``key`` and the allowed values."""
    if space not in SPACES:
        raise ValueError(f"{key} must be one of {', '.join(SPACES)}, got {space!r}")
    return space  # type: ignore[return-value]


def check_objective(objective: str) -> Objective:
    """``objective`` if it is one of eps, x0, v; else a ValueError naming the allowed values."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    return objective  # type: ignore[return-value]


def objective_target(objective: Objective, x0: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
    """The regression target of ``objective``: eps, x0 or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0; shapes (B, ...)."""
    if objective == "eps":
        return eps
    if objective == "x0":
        return x0
    return v_from_x0_eps(x0, eps, abar_t)


def _x0_units(weighting: str, snr_t: Tensor, gamma: float) -> Tensor:
    """lambda(t) of a weighting in x0 units (module docstring)."""
    if weighting == "eps":
        return snr_t
    if weighting == "x0":
        return torch.ones_like(snr_t)
    if weighting == "v":
        return 1 + snr_t
    return snr_t.clamp(max=gamma)


def loss_weight(abar_t: Tensor, objective: Objective, weighting: Weighting = "uniform", gamma: float = 5.0) -> Tensor:
    """w(t) = lambda_weighting(t) / lambda_objective(t) (module docstring), float64, shaped like abar_t."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    if weighting == "min_snr" and not gamma > 0:
        raise ValueError(f"min_snr weighting needs gamma > 0, got gamma={gamma}")
    if weighting in ("uniform", objective):
        return torch.ones_like(abar_t)
    snr_t = snr(abar_t)
    return _x0_units(weighting, snr_t, gamma) / _x0_units(objective, snr_t, gamma)


class DiffusionLoss:
    """The training loss's knobs (the ``loss`` config group): w(t) ||target - output||^2 with t ~ ``timestep_sampling``,
    plus ``vlb_weight`` T L_t when the network ``learn_variance`` (L_hybrid, Nichol & Dhariwal 2021).

    ``weighting`` and ``min_snr_gamma`` choose w(t) (:func:`loss_weight`); ``timestep_sampling`` is uniform or
    loss_aware (:mod:`difflab.timestep_sampling`). ``space`` (shaped noise only) is where the error is measured:
    ``white``, ||e||^2 in the whitened coordinates the process runs in (every direction alike), or ``data``,
    ||A e||^2 n / tr C, the error as the image sees it (each direction weighted by its noise variance; the same
    scale as ``white`` for iid noise, where the two are one). A new knob is a field here and a key in ``conf/loss/``.
    """

    def __init__(
        self,
        weighting: Weighting = "uniform",
        min_snr_gamma: float = 5.0,
        learn_variance: bool = False,
        vlb_weight: float = 0.001,
        timestep_sampling: str = "uniform",
        space: Space = "white",
    ) -> None:
        self.weighting, self.min_snr_gamma, self.learn_variance = weighting, float(min_snr_gamma), bool(learn_variance)
        self.vlb_weight, self.timestep_sampling = float(vlb_weight), timestep_sampling
        self.space = check_space("loss.space", space)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss.weighting {self.weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
        if self.weighting == "min_snr" and not self.min_snr_gamma > 0:
            raise ValueError(f"loss.min_snr_gamma must be > 0 for min_snr weighting, got {self.min_snr_gamma}")
        if not self.vlb_weight >= 0:
            raise ValueError(f"loss.vlb_weight must be >= 0, got {self.vlb_weight}")

    def weight(self, abar_t: Tensor, objective: Objective) -> Tensor | None:
        """w(t) of each sample (B,) for ``objective``, or None where it is 1 (the objective's own loss)."""
        if self.weighting == "uniform":
            return None
        return loss_weight(abar_t.flatten(), objective, self.weighting, self.min_snr_gamma)


@dataclass(frozen=True)
class Prediction:
    """The network's answer at (x_t, t) in its own ``objective``, readable as eps, x0 or v.

    ``output`` and ``x_t`` are (B, C, H, W); ``abar_t`` is float64, broadcastable to them
    ((B, 1, 1, 1)). ``variance_frac`` is the learned-variance interpolation nu in
    log Sigma = nu log beta + (1 - nu) log beta~ (Nichol & Dhariwal 2021, eq. 15), shaped like
    ``output``, or None for a fixed variance. Guidance and x0 clipping build new Predictions;
    nothing is changed in place.
    """

    output: Tensor
    objective: Objective
    x_t: Tensor
    abar_t: Tensor
    variance_frac: Tensor | None = None

    @property
    def eps(self) -> Tensor:
        """eps_hat, by eq. 4 (x0 objective) or from v."""
        if self.objective == "eps":
            return self.output
        if self.objective == "x0":
            return eps_from_x0(self.x_t, self.output, self.abar_t)
        return eps_from_v(self.x_t, self.output, self.abar_t)

    @property
    def x0(self) -> Tensor:
        """x0_hat, by eq. 15 (eps objective) or from v; undefined for eps at abar_t = 0."""
        if self.objective == "x0":
            return self.output
        if self.objective == "eps":
            return x0_from_eps(self.x_t, self.output, self.abar_t)
        return x0_from_v(self.x_t, self.output, self.abar_t)

    @property
    def v(self) -> Tensor:
        """v_hat = sqrt(abar_t) eps_hat - sqrt(1 - abar_t) x0_hat."""
        return self.output if self.objective == "v" else v_from_x0_eps(self.x0, self.eps, self.abar_t)

    def as_objective(self, objective: Objective) -> Tensor:
        """The prediction expressed as ``objective`` (the output itself when it already is)."""
        return getattr(self, check_objective(objective))

    def with_output(self, output: Tensor, objective: Objective | None = None) -> Prediction:
        """The same state and variance with another output (in ``objective``, default this one's)."""
        return replace(self, output=output, objective=objective or self.objective)
