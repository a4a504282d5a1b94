"""Samplers: small step rules over ``pred = denoiser(x_t, t, abar_t, y)``, sharing one loop."""

from difflab.samplers.base import Denoiser, PairSampler, Sampler, Stepper, X0Clipping, dynamic_threshold, sample_loop
from difflab.samplers.ddim import DDIM, ddim_step
from difflab.samplers.ddpm import DDPM, ddpm_step, learned_variance, step_variances
from difflab.samplers.timesteps import step_pairs, timestep_grid
from difflab.samplers.zoo import SCHEDULERS, DiffusersSampler

__all__ = [
    "DDIM", "DDPM", "SCHEDULERS", "Denoiser", "DiffusersSampler", "PairSampler", "Sampler", "Stepper", "X0Clipping",
    "ddim_step", "ddpm_step", "dynamic_threshold", "learned_variance", "sample_loop", "step_pairs", "step_variances",
    "timestep_grid",
]
