"""Samplers against diffusers' schedulers (peer oracle) and against an analytic Gaussian denoiser."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from difflab.noise import PerSampleNoise
from difflab.samplers import DDIM, DDPM, ddim_step, ddpm_step, sample_loop, step_pairs, timestep_grid
from difflab.schedule import NoiseSchedule

SCHEDULES = {
    "linear": (NoiseSchedule.linear, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}),
    "cosine": (NoiseSchedule.cosine, {"beta_schedule": "squaredcos_cap_v2"}),
}


def test_add_noise_equals_q_sample():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1000, 1, 4, 4, generator=gen), torch.randn(1000, 1, 4, 4, generator=gen)
    t = torch.arange(1000)
    for make, kwargs in SCHEDULES.values():
        ours = make()
        theirs = DDPMScheduler(num_train_timesteps=1000, **kwargs)
        assert torch.allclose(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-5, atol=1e-7)
        assert torch.allclose(ours.q_sample(x0, t, noise), theirs.add_noise(x0, noise, t), atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1000, 50, 7])
def test_timestep_grid_matches_diffusers(spacing, num_steps):
    theirs = DDPMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    theirs.set_timesteps(num_steps)
    assert timestep_grid(1000, num_steps, spacing) == theirs.timesteps.tolist()


def test_step_pairs_are_explicit_and_end_at_minus_one():
    assert step_pairs([999, 499, 0]) == [(999, 499), (499, 0), (0, -1)]
    with pytest.raises(ValueError, match="strictly descending"):
        step_pairs([5, 5, 0])
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 1000\]"):
        timestep_grid(1000, 1001)
    with pytest.raises(ValueError, match="allowed: trailing, leading, linspace"):
        timestep_grid(1000, 10, "uniform")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("num_steps", [1000, 50])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ddpm_step_equals_diffusers(schedule, spacing, num_steps, variance):
    make, kwargs = SCHEDULES[schedule]
    abar = make().alphas_cumprod  # float64 on both sides: float32 rounding at small t would hide the formulas
    theirs = DDPMScheduler(
        num_train_timesteps=1000, clip_sample=False, timestep_spacing=spacing,
        variance_type="fixed_small" if variance == "beta_tilde" else "fixed_large", **kwargs,
    )
    theirs.set_timesteps(num_steps)
    theirs.alphas_cumprod = abar
    pairs = step_pairs(timestep_grid(1000, num_steps, spacing))
    gen = torch.Generator().manual_seed(2)
    x_t, eps = (torch.randn(4, 1, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    last = len(pairs) - 1
    # Algorithm 2 adds no noise on the last step; diffusers adds beta noise there when t > 0, so the
    # last step is compared only where both add none (beta~ = 0 there).
    steps = [0, 1, last // 2, last - 1] + ([last] if variance == "beta_tilde" else [])
    for i in steps:
        t, t_prev = pairs[i]
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        expected = theirs.step(eps, t, x_t, generator=torch.Generator().manual_seed(i)).prev_sample
        abar_prev = abar[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        got = ddpm_step(x_t, eps, abar[t], abar_prev, z if i < last else None, variance)
        assert torch.allclose(got, expected, atol=1e-5), (t, t_prev, (got - expected).abs().max())


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_equals_diffusers(schedule, eta):
    # diffusers' DDIM derives t_prev by a stride that is right for "leading" spacing only (#12633).
    make, kwargs = SCHEDULES[schedule]
    abar = make().alphas_cumprod  # float64 on both sides: float32 rounding at small t would hide the formulas
    theirs = DDIMScheduler(
        num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", **kwargs
    )
    theirs.set_timesteps(50)
    theirs.alphas_cumprod = abar
    pairs = step_pairs(timestep_grid(1000, 50, "leading"))
    gen = torch.Generator().manual_seed(3)
    x_t, eps = (torch.randn(4, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    for t, t_prev in pairs[:3] + pairs[24:26] + pairs[-2:]:
        z = torch.randn(x_t.shape, generator=gen, dtype=torch.float64)
        expected = theirs.step(eps, t, x_t, eta=eta, variance_noise=z).prev_sample
        abar_prev = abar[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        got = ddim_step(x_t, eps, abar[t], abar_prev, z, eta)
        assert torch.allclose(got, expected, atol=1e-5), (t, t_prev, (got - expected).abs().max())


class GaussianDenoiser:
    """The exact E[eps | x_t] for data x0 ~ N(mu, Sigma): sqrt(1-abar) (abar Sigma + (1-abar) I)^-1 (x_t - sqrt(abar) mu)."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        self.mu, self.sigma, self.abar = mu.double(), sigma.double(), alphas_cumprod.double()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        abar = self.abar[t[0]]
        d = self.mu.numel()
        precision = torch.linalg.inv(abar * self.sigma + (1 - abar) * torch.eye(d, dtype=torch.float64))
        flat = x_t.reshape(len(x_t), d).double() - abar.sqrt() * self.mu
        return ((1 - abar).sqrt() * flat @ precision.T).reshape(x_t.shape).to(x_t.dtype)


class BatchNoise:
    """One generator for the whole batch: fine for statistics, cheaper than per-sample streams."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.gen = n, torch.Generator().manual_seed(seed)

    def randn(self, shape, dtype=torch.float64):
        return torch.randn((self.n, *shape), generator=self.gen, dtype=dtype)


@pytest.mark.parametrize(
    ("sampler", "schedule", "bias"),
    [
        (DDPM(), "linear", 0.0),
        (DDPM(variance="beta"), "cosine", 0.0),
        (DDIM(num_steps=1000), "linear", 0.0),
        (DDIM(num_steps=50), "linear", 0.10),
        (DDIM(num_steps=50), "cosine", 0.10),
    ],
    ids=["ddpm1000-beta_tilde-linear", "ddpm1000-beta-cosine", "ddim1000-linear", "ddim50-linear", "ddim50-cosine"],
)
def test_analytic_denoiser_recovers_the_gaussian(sampler, schedule, bias):
    """Sampling with the exact denoiser of N(mu, Sigma) must return N(mu, Sigma).

    Tolerance: 5 standard errors of each estimator at N samples (mean: sqrt(S_ii / N); covariance
    entries: sqrt((S_ii S_jj + S_ij^2) / N)), plus 0.01 absolute, plus the sampler's own
    discretisation ``bias`` as a fraction of ||Sigma||_F. The deterministic 50-step DDIM ODE shrinks
    the variances by 5-15% (measured; it falls to ~1% at 1000 steps, where no bias is allowed), so
    it gets 10%; the 1000-step samplers get none.
    """
    n, d = 20_000, 4
    gen = torch.Generator().manual_seed(4)
    mu = torch.tensor([1.0, -0.5, 0.3, 0.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    sigma = q @ torch.diag(torch.tensor([1.0, 0.5, 0.2, 0.1], dtype=torch.float64)) @ q.T
    abar = SCHEDULES[schedule][0]().alphas_cumprod
    noise = BatchNoise(n, seed=5)
    x = noise.randn((1, 2, 2))
    out = sample_loop(
        GaussianDenoiser(mu, sigma, abar), sampler.step, abar, sampler.pairs(1000), x,
        noise if sampler.stochastic else None,
    ).reshape(n, d)
    mean_err = (out.mean(0) - mu).abs()
    assert bool((mean_err <= 5 * (sigma.diag() / n).sqrt() + 0.01).all()), mean_err
    cov_err = torch.linalg.matrix_norm(torch.cov(out.T) - sigma)
    se = ((sigma.diag()[:, None] * sigma.diag()[None, :] + sigma**2) / n).sqrt()
    assert cov_err <= 5 * torch.linalg.matrix_norm(se) + 0.01 + bias * torch.linalg.matrix_norm(sigma), cov_err


def test_sampler_options_are_validated():
    with pytest.raises(ValueError, match="allowed: beta_tilde, beta"):
        DDPM(variance="learned")
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\], got eta=1.5"):
        DDIM(eta=1.5)


def test_per_sample_noise_does_not_depend_on_the_batch():
    whole = PerSampleNoise.for_indices(7, range(6)).randn((2, 3))
    parts = torch.cat([PerSampleNoise.for_indices(7, range(0, 4)).randn((2, 3)), PerSampleNoise.for_indices(7, range(4, 6)).randn((2, 3))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, PerSampleNoise.for_indices(8, range(6)).randn((2, 3)))
    assert not torch.equal(whole[0], whole[1])
