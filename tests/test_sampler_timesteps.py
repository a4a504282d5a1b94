"""Every sampler config builds finite timesteps on the linear and cosine schedules; non-finite ones are refused."""

from __future__ import annotations

import logging

import pytest
import torch
from hydra.utils import instantiate

from difflab.errors import ConfigError
from difflab.samplers import DiffusersSampler, PairSampler
from difflab.samplers.zoo import ZERO_SNR_ABAR
from difflab.schedule import NoiseSchedule
from tests.conftest import CONF, compose

SAMPLERS = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))
SCHEDULES = {"linear": NoiseSchedule.linear, "cosine": NoiseSchedule.cosine}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_config_has_finite_timesteps_at_10_steps(name, schedule, dtype):
    """conf/sampler/NAME.yaml at 10 steps for a v-model whose abar the module holds in ``dtype``."""
    sampler = instantiate(compose("sample", [f"sampler={name}", "ckpt=x", "sampler.num_steps=10"]).sampler)
    abar = SCHEDULES[schedule](1000).alphas_cumprod.to(dtype)
    if isinstance(sampler, PairSampler):
        timesteps = torch.tensor([t for t, _ in sampler.pairs(1000)], dtype=torch.float64)
        assert len(timesteps) == 10
    else:
        assert isinstance(sampler, DiffusersSampler)
        logging.disable(logging.WARNING)  # the wide-first-step warning (tests/test_samplers.py checks it)
        try:
            scheduler = sampler.build(abar, "v")
        finally:
            logging.disable(logging.NOTSET)
        timesteps = scheduler.timesteps.double()
        sigmas = getattr(scheduler, "sigmas", None)
        assert sigmas is None or torch.isfinite(sigmas).all(), sigmas
    assert torch.isfinite(timesteps).all(), timesteps
    assert 0 <= float(timesteps.min()) and float(timesteps.max()) <= 999
    if sampler.spacing == "trailing":
        assert float(timesteps[0]) == 999.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_kdpm2_ancestral_starts_at_the_float32_noise_floor_on_cosine(dtype):
    """The regression: NaN at timesteps[1] (0.42.1). Now sigma_max = sqrt((1 - 2^-24) / 2^-24) = 4096, and the
    first step's interpolated timestep lies between the first two grid timesteps (999, 899)."""
    abar = NoiseSchedule.cosine(1000).alphas_cumprod.to(dtype)
    assert float(abar[-1]) < ZERO_SNR_ABAR  # 2.4e-9: beta clipped at 0.999
    logging.disable(logging.WARNING)
    try:
        scheduler = DiffusersSampler(scheduler="KDPM2AncestralDiscreteScheduler", num_steps=10).build(abar, "v")
    finally:
        logging.disable(logging.NOTSET)
    assert float(scheduler.sigmas[0]) == pytest.approx(4096.0, rel=1e-3)
    assert float(scheduler.timesteps[0]) == 999.0 and float(scheduler.timesteps[2]) == 899.0
    assert 899.0 < float(scheduler.timesteps[1]) < 999.0


def test_a_scheduler_with_non_finite_timesteps_is_refused():
    """KDPM2 ancestral on linspace at 2 steps (t = 999, 0): its first step spans sigma 157 -> 0.01, and diffusers'
    float32 sigma_down cancels to 0, so the interpolated timestep is NaN: a ConfigError, not a NaN sample."""
    abar = NoiseSchedule.linear(1000).alphas_cumprod
    sampler = DiffusersSampler(scheduler="KDPM2AncestralDiscreteScheduler", num_steps=2, spacing="linspace")
    with pytest.raises(ConfigError) as err:
        sampler.build(abar, "eps")
    message = str(err.value)
    assert "KDPM2AncestralDiscreteScheduler (spacing=linspace, karras=False)" in message
    assert "non-finite timesteps at num_steps=2" in message
    assert "T=1000, abar from 1 to 4.04e-05" in message
