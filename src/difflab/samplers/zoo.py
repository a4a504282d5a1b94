"""diffusers' schedulers as difflab samplers: DPM-Solver++, UniPC, DEIS, Euler (ancestral), Heun, PNDM, LMS, ...

The one sampler module that imports diffusers. Each scheduler is built from the trained schedule
itself (``trained_betas`` = 1 - abar_t / abar_{t-1} of the model's ``alphas_cumprod``) and the
run's objective as its ``prediction_type``, so training and sampling cannot disagree; diffusers'
own ``clip_sample`` and ``thresholding`` stay off (difflab's :class:`~difflab.samplers.base.X0Clipping`
does that for every sampler). It walks through the same :func:`~difflab.samplers.base.sample_loop`
and the same denoiser wrappers (guidance, shaped noise) as difflab's DDPM and DDIM.

Sigma-space schedulers (Euler, Heun, KDPM2, LMS) keep x = x0 + sigma eps and feed the network
x / sqrt(sigma^2 + 1); its abar_t is then 1 / (1 + sigma^2) of the sigma the scheduler scaled by,
possibly between training timesteps (Karras sigmas, linspace spacing). With zero terminal SNR the
last abar is raised from 0 to 2^-24, as diffusers itself does (``rescale_betas_zero_snr``); for the
sigma-space schedulers (:data:`SIGMA_SPACE`) every abar below 2^-24 is, e.g. the cosine schedule's last
(2.4e-9, where beta is clipped at 0.999). They compute in float32, where 1 - abar is exactly 1 below 2^-24,
so such a step is pure noise either way; but its sigma, 2e4 instead of 4096, made KDPM2 ancestral's
sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancel to 0 and its first interpolated timestep NaN (diffusers
0.42). A scheduler whose timesteps or sigmas still come out non-finite is refused with a ConfigError.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
from torch import Tensor

from difflab.errors import ConfigError
from difflab.objectives import Objective, Prediction
from difflab.samplers.base import Sampler
from difflab.seeding import PerSampleNoise

log = logging.getLogger(__name__)

SIGMA_SPACE: tuple[str, ...] = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "LMSDiscreteScheduler",
)
"""The schedulers that walk sigma = sqrt((1 - abar) / abar) in float32: handed abar of at least 2^-24."""
SCHEDULERS: tuple[str, ...] = (
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "SASolverScheduler",
    *SIGMA_SPACE,
    "PNDMScheduler",
)
"""The diffusers schedulers for discrete-time eps / x0 / v models that take ``trained_betas``."""

PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
WIDE_FIRST_STEP = {"HeunDiscreteScheduler": 100.0, "KDPM2AncestralDiscreteScheduler": 100.0, "PNDMScheduler": 100.0}
"""sigma_0 / sigma_1 of the first step (sigma = sqrt((1 - abar) / abar)) above which these schedulers are
inaccurate. Measured on the analytic Gaussian (20 steps, trailing): the cosine schedule's first step spans
sigma 2e4 -> 13 (ratio ~1600) and the covariance error grows from 0.036 to 33.7 (Heun), from 0.05 to 1.05
(KDPM2 ancestral) and from 0.014 to 2e11 (PNDM); at ratios up to 17 (linear, zero terminal SNR) all three
are fine, as are Euler, KDPM2, LMS and the VP-space solvers (DPM-Solver, UniPC, DEIS, SA-Solver) at any ratio."""
OBJECTIVES_TAKEN: dict[str, tuple[str, ...]] = {
    "EulerAncestralDiscreteScheduler": ("eps", "v"),
    "KDPM2DiscreteScheduler": ("eps", "v"),
    "KDPM2AncestralDiscreteScheduler": ("eps", "v"),
    "PNDMScheduler": ("eps",),
}
"""Schedulers that do not take every objective: the first three raise NotImplementedError for ``sample``
(x0); PNDM takes ``v_prediction`` but mixes v's of different timesteps in its linear multistep, which
measured 13x the covariance error of handing it eps (analytic Gaussian, 20 steps). Others take all three."""
ZERO_SNR_ABAR = 2.0**-24
"""The least abar handed to diffusers (to :data:`SIGMA_SPACE` for every t): float32's 1 - abar is 1 below it."""


def _init_parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def diffusers_betas(alphas_cumprod: Tensor) -> Tensor:
    """beta_t = 1 - abar_t / abar_{t-1} (float64, (T,)), with a zero terminal abar raised to 2^-24 (diffusers' rule)."""
    abar = alphas_cumprod.double().clone()
    if abar[-1] == 0:
        abar[-1] = ZERO_SNR_ABAR
    return 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])


@dataclass
class DiffusersSampler(Sampler):
    """A diffusers ``scheduler`` (class name, one of :data:`SCHEDULERS`) walked for ``num_steps`` steps.

    ``spacing`` is diffusers' ``timestep_spacing`` (null for schedulers without one), ``karras``
    its ``use_karras_sigmas`` (Karras et al. 2022), ``options`` any other constructor argument
    (``algorithm_type``, ``solver_order``, ...). Heun and KDPM2 evaluate the model about twice per
    step: their number of model evaluations is 2 num_steps - 1.
    """

    scheduler: str = "DPMSolverMultistepScheduler"
    num_steps: int | None = 20
    karras: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.options = dict(self.options)  # a plain dict, also when Hydra passes a DictConfig
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown diffusers scheduler {self.scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
        if self.num_steps is None:
            raise ValueError(f"sampler num_steps must be set for {self.scheduler}")
        accepted = _init_parameters(self.cls)
        fixed = {"num_train_timesteps", "trained_betas", "prediction_type", "timestep_spacing", "use_karras_sigmas"}
        unknown = sorted(set(self.options) - (accepted - fixed))
        if unknown:
            raise ValueError(
                f"{self.scheduler} has no option {', '.join(unknown)}; allowed: {', '.join(sorted(accepted - fixed))}"
            )
        if self.spacing is not None and "timestep_spacing" not in accepted:
            raise ValueError(f"{self.scheduler} has no timestep spacing: set sampler.spacing=null")
        if self.karras and "use_karras_sigmas" not in accepted:
            raise ValueError(f"{self.scheduler} has no Karras sigmas: set sampler.karras=false")

    @property
    def cls(self) -> type:
        """The diffusers scheduler class."""
        return getattr(diffusers, self.scheduler)

    def build(self, alphas_cumprod: Tensor, objective: Objective = "eps") -> Any:
        """The scheduler for a model trained on ``alphas_cumprod`` predicting ``objective``, timesteps set."""
        accepted = _init_parameters(self.cls)
        abar = alphas_cumprod.double().clamp(min=ZERO_SNR_ABAR if self.scheduler in SIGMA_SPACE else 0.0)
        kwargs: dict[str, Any] = {
            "num_train_timesteps": alphas_cumprod.numel(),
            "trained_betas": diffusers_betas(abar).cpu().numpy(),
            "prediction_type": PREDICTION_TYPES[self.prediction_objective(objective)],
            **{k: False for k in ("clip_sample", "thresholding") if k in accepted},
            **({"timestep_spacing": self.spacing} if self.spacing is not None else {}),
            **({"use_karras_sigmas": True} if self.karras else {}),
            **self.options,
        }
        scheduler = self.cls(**kwargs)
        scheduler.set_timesteps(self.num_steps, device=alphas_cumprod.device)
        self._check_finite(scheduler, alphas_cumprod)
        t0, t1 = (int(t) for t in scheduler.timesteps.unique_consecutive()[:2].round())
        sigma0, sigma1 = (float(((1 - alphas_cumprod[t]) / alphas_cumprod[t]).sqrt()) for t in (t0, t1))
        if sigma0 / sigma1 > WIDE_FIRST_STEP.get(self.scheduler, float("inf")):
            log.warning(
                "%s's first step spans sigma %.3g -> %.3g on this schedule: too wide for it (measured unstable; "
                "see difflab.samplers.zoo.WIDE_FIRST_STEP). Use sampler.spacing=leading, or another sampler "
                "(dpmpp_2m, unipc, kdpm2, ddim)", self.scheduler, sigma0, sigma1,
            )
        return scheduler

    def _check_finite(self, scheduler: Any, alphas_cumprod: Tensor) -> None:
        """Refuse a built ``scheduler`` whose ``timesteps`` or ``sigmas`` hold NaN or inf (ConfigError)."""
        bad = [
            name for name in ("timesteps", "sigmas")
            if getattr(scheduler, name, None) is not None and not torch.isfinite(getattr(scheduler, name)).all()
        ]
        if bad:
            abar = alphas_cumprod.double()
            raise ConfigError(
                f"sampler {self.scheduler} (spacing={self.spacing}, karras={self.karras}) gives non-finite "
                f"{' and '.join(bad)} at num_steps={self.num_steps} on this schedule (T={abar.numel()}, "
                f"abar from {float(abar[0]):.3g} to {float(abar[-1]):.3g}); allowed: a step count, spacing or "
                "sampler whose timesteps are finite: try more steps, sampler.spacing=leading, or another sampler "
                "(dpmpp_2m, unipc, ddim)"
            )

    def prediction_objective(self, objective: Objective) -> Objective:
        """The objective handed to the scheduler: the run's, or eps where it cannot take it (:data:`OBJECTIVES_TAKEN`).

        The conversion is exact (:class:`~difflab.objectives.Prediction`), so this changes no result.
        """
        return objective if objective in OBJECTIVES_TAKEN.get(self.scheduler, ("eps", "x0", "v")) else "eps"

    def stepper(self, alphas_cumprod: Tensor, noise: PerSampleNoise, objective: Objective = "eps") -> SchedulerStepper:
        return SchedulerStepper(self.build(alphas_cumprod, objective), self.prediction_objective(objective), noise)


class SchedulerStepper:
    """A walk over a diffusers scheduler's timesteps; per-sample generators for its noise."""

    def __init__(self, scheduler: Any, objective: Objective, noise: PerSampleNoise) -> None:
        self.scheduler, self.objective = scheduler, objective
        self.timesteps = scheduler.timesteps
        self.num_evals = len(self.timesteps)
        self.step_kwargs = (
            {"generator": noise.generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
        )
        self.sigma_space = float(scheduler.init_noise_sigma) != 1.0
        sigmas = getattr(scheduler, "sigmas", None)
        self.vp_sigmas = sigmas if sigmas is not None and len(sigmas) == self.num_evals + 1 else None

    def start(self, z: Tensor) -> Tensor:
        return z * self.scheduler.init_noise_sigma

    def model_input(self, i: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = self.timesteps[i]
        x_t = self.scheduler.scale_model_input(x, t)
        if self.sigma_space:  # x_t = x / sqrt(sigma^2 + 1): abar_t = 1 / (sigma^2 + 1)
            abar_t = self.scheduler.scale_model_input(torch.ones((), device=x.device), t).double() ** 2
        elif self.vp_sigmas is not None:  # the scheduler's own sigma = sqrt((1 - abar) / abar) of step i
            abar_t = 1 / (1 + self.vp_sigmas[i].double() ** 2)
        else:
            abar_t = self.scheduler.alphas_cumprod[int(t)].double()
        return x_t, t, abar_t

    def step(self, i: int, x: Tensor, pred: Prediction) -> Tensor:
        output = pred.as_objective(self.objective).to(x.dtype)
        return self.scheduler.step(output, self.timesteps[i], x, **self.step_kwargs).prev_sample
