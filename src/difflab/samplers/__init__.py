"""Samplers: small step rules over ``eps = denoiser(x_t, t, y)``, sharing one loop."""

from difflab.samplers.base import Denoiser, Sampler, sample_loop
from difflab.samplers.ddim import DDIM, ddim_step
from difflab.samplers.ddpm import DDPM, ddpm_step
from difflab.samplers.timesteps import step_pairs, timestep_grid

__all__ = ["DDIM", "DDPM", "Denoiser", "Sampler", "ddim_step", "ddpm_step", "sample_loop", "step_pairs", "timestep_grid"]
