"""The one sampling loop every sampler shares, and the sampler options every sampler has (x0 clipping).

A sampler walks a :class:`Stepper`: for each model evaluation i the stepper says which state the
network sees (x_t, its timestep t and signal level abar_t), the denoiser answers with a
:class:`~difflab.objectives.Prediction`, and the stepper moves the sample. difflab's own DDPM and
DDIM walk explicit (t, t_prev) pairs (:class:`PairStepper`); diffusers' schedulers walk their own
timesteps (:mod:`difflab.samplers.zoo`). Guidance, EMA, shaped noise and x0 clipping are wrappers
around the denoiser, never flags inside a step rule.

The denoiser returns a Prediction rather than eps: with zero terminal SNR (abar_{T-1} = 0) eps
carries no information at the first step (eps = x_t there), while x0 and v do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from difflab.seeding import PerSampleNoise
from difflab.objectives import Objective, Prediction
from difflab.samplers.timesteps import Spacing, step_pairs, timestep_grid

Denoiser = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Prediction]
"""pred = denoiser(x_t (B, C, H, W), t (B,) the timestep the network is conditioned on, abar_t (B,) float64
the signal level of x_t, y (B,) long class ids or None)."""


class Stepper(Protocol):
    """One walk of a sampler over ``num_evals`` model evaluations."""

    num_evals: int

    def start(self, z: Tensor) -> Tensor:
        """The initial sample from white noise z (B, C, H, W)."""

    def model_input(self, i: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, t, abar_t) the network sees at evaluation i: the state, a 0-d timestep, a 0-d float64 abar_t."""

    def step(self, i: int, x: Tensor, pred: Prediction) -> Tensor:
        """The sample after evaluation i, given the prediction there."""


def sample_loop(
    denoiser: Denoiser, stepper: Stepper, x: Tensor, y: Tensor | None = None,
    on_step: Callable[[float], object] | None = None,
) -> Tensor:
    """For each evaluation i: (x_t, t, abar_t) = stepper.model_input(i, x); x = stepper.step(i, x, denoiser(x_t, t, abar_t, y)).

    ``on_step(1 / num_evals)`` after each evaluation: the share of the walk done (a progress bar's update).
    """
    batch = x.shape[0]
    for i in range(stepper.num_evals):
        x_t, t, abar_t = stepper.model_input(i, x)
        pred = denoiser(x_t, t.to(x.device).expand(batch), abar_t.to(x.device).expand(batch), y)
        x = stepper.step(i, x, pred)
        if on_step is not None:
            on_step(1 / stepper.num_evals)
    return x


def dynamic_threshold(x0: Tensor, percentile: float) -> Tensor:
    """x0 clamped to [-s, s] and divided by s, s = max(1, the ``percentile`` quantile of |x0| per sample).

    Saharia et al. 2022 (Imagen), section 2.3; x0 (B, ...).
    """
    s = torch.quantile(x0.detach().abs().flatten(1).float(), percentile, dim=1).clamp(min=1.0)
    s = s.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


class X0Clipping:
    """A denoiser whose x0_hat is clipped to [-1, 1] or dynamically thresholded; eps, v follow from the new x0_hat.

    Pixel-space data in [-1, 1] only: latent runs and shaped noise refuse it (their x0 has no such range).
    """

    def __init__(self, denoiser: Denoiser, dynamic_threshold: float | None = None) -> None:
        self.denoiser, self.percentile = denoiser, dynamic_threshold

    def __call__(self, x_t: Tensor, t: Tensor, abar_t: Tensor, y: Tensor | None) -> Prediction:
        pred = self.denoiser(x_t, t, abar_t, y)
        x0 = pred.x0.clamp(-1, 1) if self.percentile is None else dynamic_threshold(pred.x0, self.percentile)
        return pred.with_output(x0, "x0")


@dataclass
class Sampler:
    """What every sampler has: a number of steps, a timestep spacing, and optional x0 clipping.

    ``clip_x0`` clips x0_hat to [-1, 1] at every step; ``dynamic_threshold`` (a percentile p in
    (0, 1), 0.995 in Imagen) thresholds it instead. Both are off by default.
    """

    num_steps: int | None = None
    spacing: Spacing | None = "trailing"
    clip_x0: bool = False
    dynamic_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.num_steps is not None and (int(self.num_steps) != self.num_steps or self.num_steps < 1):
            raise ValueError(f"sampler num_steps must be a positive integer (or null: all T), got {self.num_steps}")
        if self.dynamic_threshold is not None and not 0.0 < self.dynamic_threshold < 1.0:
            raise ValueError(f"sampler dynamic_threshold is a percentile in (0, 1) such as 0.995, got {self.dynamic_threshold}")

    @property
    def shapes_x0(self) -> bool:
        """Whether this sampler clips or thresholds x0_hat (pixel space only)."""
        return self.clip_x0 or self.dynamic_threshold is not None

    def stepper(self, alphas_cumprod: Tensor, noise: PerSampleNoise, objective: Objective = "eps") -> Stepper:
        """The walk for a model trained on ``alphas_cumprod`` (float64, (T,)) predicting ``objective``."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self,
        denoiser: Denoiser,
        alphas_cumprod: Tensor,
        noise: PerSampleNoise,
        shape: Sequence[int],
        y: Tensor | None = None,
        on_step: Callable[[float], object] | None = None,
        objective: Objective = "eps",
    ) -> Tensor:
        """Draw len(noise) samples of ``shape`` (C, H, W) from white noise; returns (N, C, H, W).

        ``objective`` is what the denoiser's network predicts; samplers that take a prediction type
        (diffusers') get the prediction in that objective. ``on_step``: see :func:`sample_loop`.
        """
        if self.shapes_x0:
            denoiser = X0Clipping(denoiser, self.dynamic_threshold)
        stepper = self.stepper(alphas_cumprod.to(noise.device), noise, objective)
        return sample_loop(denoiser, stepper, stepper.start(noise.randn(shape)), y, on_step)


class PairStepper:
    """A walk over explicit (t, t_prev) pairs: x_{t'} = rule(i, x_t, pred, abar_t, abar_{t'}, z).

    z is per-sample noise for stochastic rules and None on the last step (t' = -1, abar = 1).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[int, int]],
        alphas_cumprod: Tensor,
        rule: Callable[[int, Tensor, Prediction, Tensor, Tensor, "Tensor | None"], Tensor],
        noise: PerSampleNoise | None,
    ) -> None:
        self.pairs, self.alphas_cumprod, self.rule, self.noise = list(pairs), alphas_cumprod, rule, noise
        self.num_evals = len(self.pairs)
        self.one = alphas_cumprod.new_ones(())

    def start(self, z: Tensor) -> Tensor:
        return z

    def model_input(self, i: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = self.pairs[i][0]
        return x, torch.tensor(t), self.alphas_cumprod[t]

    def step(self, i: int, x: Tensor, pred: Prediction) -> Tensor:
        t, t_prev = self.pairs[i]
        abar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.one
        z = self.noise.randn(x.shape[1:], x.dtype) if self.noise is not None and t_prev >= 0 else None
        return self.rule(i, x, pred, self.alphas_cumprod[t], abar_prev, z)


@dataclass
class PairSampler(Sampler):
    """A sampler walking ``num_steps`` grid timesteps (None: all T) with a ``spacing``, one step rule per pair."""

    @property
    def stochastic(self) -> bool:
        """Whether steps add fresh noise z (then each sample draws it from its own generator)."""
        return False

    def pairs(self, num_train_timesteps: int) -> list[tuple[int, int]]:
        """The (t, t_prev) pairs this sampler walks."""
        return step_pairs(timestep_grid(num_train_timesteps, self.num_steps or num_train_timesteps, self.spacing))

    def rule(self, alphas_cumprod: Tensor, pairs: list[tuple[int, int]]) -> Callable[..., Tensor]:
        """The step rule (i, x_t, pred, abar_t, abar_{t'}, z) -> x_{t'} over these pairs."""
        raise NotImplementedError

    def stepper(self, alphas_cumprod: Tensor, noise: PerSampleNoise, objective: Objective = "eps") -> PairStepper:
        pairs = self.pairs(alphas_cumprod.numel())
        return PairStepper(pairs, alphas_cumprod, self.rule(alphas_cumprod, pairs), noise if self.stochastic else None)
