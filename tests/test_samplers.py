"""Samplers against diffusers' schedulers (peer oracle) and against an analytic Gaussian denoiser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from hydra.utils import instantiate

from difflab.seeding import PerSampleNoise
from difflab.objectives import Prediction
from difflab.samplers import (
    DDIM,
    DDPM,
    DiffusersSampler,
    X0Clipping,
    ddim_step,
    ddpm_step,
    dynamic_threshold,
    sample_loop,
    step_pairs,
    timestep_grid,
)
from difflab.schedule import NoiseSchedule, x0_from_eps
from tests.conftest import CONF, compose

SCHEDULES = {
    "linear": (NoiseSchedule.linear, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}),
    "cosine": (NoiseSchedule.cosine, {"beta_schedule": "squaredcos_cap_v2"}),
}
ZOO = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml") if "DiffusersSampler" in p.read_text())


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
        beta = 1 - abar[t] / abar_prev
        sigma2 = beta if variance == "beta" else (1 - abar_prev) / (1 - abar[t]) * beta
        got = ddpm_step(x_t, x0_from_eps(x_t, eps, abar[t]), abar[t], abar_prev, z if i < last else None, sigma2)
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
        got = ddim_step(x0_from_eps(x_t, eps, abar[t]), eps, abar[t], abar_prev, z, eta)
        assert torch.allclose(got, expected, atol=1e-5), (t, t_prev, (got - expected).abs().max())


class GaussianDenoiser:
    """The exact posterior means for data x0 ~ N(mu, Sigma), expressed as ``objective``, each from its closed form.

    E[eps | x_t] = sqrt(1-abar) P (x_t - sqrt(abar) mu), E[x0 | x_t] = mu + sqrt(abar) Sigma P (x_t - sqrt(abar) mu),
    P = (abar Sigma + (1-abar) I)^-1, and E[v | x_t] = sqrt(abar) E[eps | x_t] - sqrt(1-abar) E[x0 | x_t].
    """

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor, objective: str = "eps") -> None:
        self.mu, self.sigma, self.objective = mu.double(), sigma.double(), objective

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, abar_t: torch.Tensor, y=None) -> Prediction:
        abar = abar_t[0].double()
        d = self.mu.numel()
        precision = torch.linalg.inv(abar * self.sigma + (1 - abar) * torch.eye(d, dtype=torch.float64))
        flat = x_t.reshape(len(x_t), d).double() - abar.sqrt() * self.mu
        eps = (1 - abar).sqrt() * flat @ precision.T
        x0 = self.mu + abar.sqrt() * flat @ (self.sigma @ precision).T
        out = {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[self.objective]
        return Prediction(out.reshape(x_t.shape).to(x_t.dtype), self.objective, x_t, abar_t.reshape(-1, 1, 1, 1))


class BatchNoise:
    """One generator for the whole batch: fine for statistics, cheaper than per-sample streams."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generators, self.device = n, torch.Generator().manual_seed(seed), torch.device("cpu")

    def randn(self, shape, dtype=torch.float64):
        return torch.randn((self.n, *shape), generator=self.generators, dtype=dtype)


def _gaussian(d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    mu = torch.tensor([1.0, -0.5, 0.3, 0.0], dtype=torch.float64)[:d]
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return mu, q @ torch.diag(torch.tensor([1.0, 0.5, 0.2, 0.1], dtype=torch.float64)[:d]) @ q.T


def _draw(sampler, denoiser, abar, n: int, objective: str = "eps", seed: int = 5) -> torch.Tensor:
    noise = BatchNoise(n, seed)
    stepper = sampler.stepper(abar, noise, objective)
    return sample_loop(denoiser, stepper, stepper.start(noise.randn((1, 2, 2)))).reshape(n, -1)


def _assert_recovers(out: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, bias: float) -> None:
    """5 standard errors of each estimator at N samples (mean: sqrt(S_ii / N); covariance entries:
    sqrt((S_ii S_jj + S_ij^2) / N)), plus 0.01 absolute, plus ``bias`` x ||Sigma||_F for the sampler's
    own discretisation error."""
    n = len(out)
    mean_err = (out.mean(0) - mu).abs()
    assert bool((mean_err <= 5 * (sigma.diag() / n).sqrt() + 0.01).all()), mean_err
    cov_err = torch.linalg.matrix_norm(torch.cov(out.T) - sigma)
    se = ((sigma.diag()[:, None] * sigma.diag()[None, :] + sigma**2) / n).sqrt()
    assert cov_err <= 5 * torch.linalg.matrix_norm(se) + 0.01 + bias * torch.linalg.matrix_norm(sigma), cov_err


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
    """Sampling with the exact denoiser of N(mu, Sigma) must return N(mu, Sigma) (tolerance: _assert_recovers).

    The deterministic 50-step DDIM ODE shrinks the variances by 5-15% (measured; ~1% at 1000 steps,
    where no bias is allowed), so it gets 10%; the 1000-step samplers get none.
    """
    mu, sigma = _gaussian()
    out = _draw(sampler, GaussianDenoiser(mu, sigma), SCHEDULES[schedule][0]().alphas_cumprod, 20_000)
    _assert_recovers(out, mu, sigma, bias)


ZOO_BIAS = {"euler": 0.03, "euler_ancestral": 0.15}
"""Discretisation error allowed at the config's default num_steps, as a fraction of ||Sigma||_F (measured:
Euler 50 steps 0.3%, Euler ancestral 50 steps 7.7% over the statistical tolerance; both first order). Every
other zoo sampler recovers the Gaussian within the statistical tolerance alone at its default steps."""


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_sampler_recovers_the_gaussian_at_its_default_steps(name, schedule, caplog):
    """conf/sampler/NAME.yaml as users get it: num_steps is the documented budget (20 for most; see each file).

    The cosine schedule's first trailing step spans sigma 2e4 -> 13, too wide for Heun, KDPM2 ancestral
    and PNDM (zoo.WIDE_FIRST_STEP, measured): on it they must warn instead.
    """
    sampler = instantiate(compose("sample", [f"sampler={name}", "ckpt=x"]).sampler)
    abar = SCHEDULES[schedule][0]().alphas_cumprod
    if schedule == "cosine" and name in ("heun", "kdpm2_ancestral", "pndm"):
        with caplog.at_level("WARNING"):
            sampler.build(abar)
        assert re.search(r"first step spans sigma 2\.0\de\+04 -> \d+\.\d", caplog.text) and "spacing=leading" in caplog.text
        return
    mu, sigma = _gaussian()
    _assert_recovers(_draw(sampler, GaussianDenoiser(mu, sigma), abar, 20_000), mu, sigma, ZOO_BIAS.get(name, 0.0))


@pytest.mark.parametrize(
    ("sampler", "atol"),
    [
        (DDPM(num_steps=50), 1e-9), (DDIM(num_steps=20), 1e-9), (DDIM(num_steps=20, eta=1.0), 1e-9),
        (DiffusersSampler(scheduler="DPMSolverMultistepScheduler", num_steps=10), 1e-5),
        (DiffusersSampler(scheduler="EulerAncestralDiscreteScheduler", num_steps=10), 1e-5),
        (DiffusersSampler(scheduler="HeunDiscreteScheduler", num_steps=10), 1e-5),
    ],
    ids=["ddpm50", "ddim20", "ddim20-eta1", "dpmpp_2m", "euler_ancestral", "heun"],
)
@pytest.mark.parametrize("schedule", ["linear", "zero_snr"])
def test_every_objective_gives_the_same_samples(sampler, atol, schedule):
    """The same model expressed as eps, x0 or v: the same samples (diffusers' float32 coefficients: 1e-5).

    With zero terminal SNR eps is undefined at the first step, so only x0 and v are compared there.
    """
    abar = NoiseSchedule.linear(zero_terminal_snr=schedule == "zero_snr").alphas_cumprod
    mu, sigma = _gaussian()
    objectives = ["x0", "v"] if schedule == "zero_snr" else ["eps", "x0", "v"]
    outs = [_draw(sampler, GaussianDenoiser(mu, sigma, obj), abar, 256, obj) for obj in objectives]
    assert all(torch.isfinite(o).all() for o in outs)
    for other in outs[1:]:
        assert (other - outs[0]).abs().max() <= atol


def test_x0_clipping_and_dynamic_thresholding():
    x0 = torch.tensor([[0.5, -3.0, 2.0, 0.1], [0.2, 0.3, -0.4, 0.5]]).reshape(2, 1, 2, 2)
    # Imagen: s = max(1, p-quantile of |x0|); clamp to [-s, s], divide by s. Row 2 is within [-1, 1]: unchanged.
    s = torch.quantile(torch.tensor([0.5, 3.0, 2.0, 0.1]), 0.9)
    expected = torch.tensor([0.5, -s, 2.0, 0.1]) / s
    out = dynamic_threshold(x0, 0.9)
    assert torch.allclose(out[0].flatten(), expected) and torch.equal(out[1], x0[1])

    def wild(x_t, t, abar_t, y):  # predicts x0 = 5 x_t: far outside [-1, 1]
        return Prediction(5 * x_t, "x0", x_t, abar_t.reshape(-1, 1, 1, 1))

    abar = NoiseSchedule.linear().alphas_cumprod
    t, a = torch.tensor([500, 500]), abar[[500, 500]]
    clipped = X0Clipping(wild)(x0, t, a, None)
    assert clipped.objective == "x0" and clipped.output.abs().max() <= 1
    a = a.view(-1, 1, 1, 1).float()
    assert torch.allclose(clipped.eps, (x0 - a.sqrt() * clipped.output) / (1 - a).sqrt())
    samples = DDIM(num_steps=10, clip_x0=True)(wild, abar, PerSampleNoise.for_indices(0, range(8)), (1, 2, 2))
    assert samples.abs().max() <= 1 + 1e-6  # the last DDIM step returns x0_hat itself
    with pytest.raises(ValueError, match="percentile in \\(0, 1\\)"):
        DDIM(dynamic_threshold=99.5)


def test_sampler_options_are_validated():
    with pytest.raises(ValueError, match="allowed: auto, beta_tilde, beta, learned"):
        DDPM(variance="large")
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\], got eta=1.5"):
        DDIM(eta=1.5)
    with pytest.raises(ValueError, match="unknown diffusers scheduler 'DDIMScheduler'; allowed: DPMSolverMultistepScheduler"):
        DiffusersSampler(scheduler="DDIMScheduler")
    with pytest.raises(ValueError, match="has no option solver_oder; allowed: .*solver_order"):
        DiffusersSampler(options={"solver_oder": 2})
    with pytest.raises(ValueError, match="PNDMScheduler has no Karras sigmas"):
        DiffusersSampler(scheduler="PNDMScheduler", karras=True)
    with pytest.raises(ValueError, match="DPMSolverSinglestepScheduler has no timestep spacing"):
        DiffusersSampler(scheduler="DPMSolverSinglestepScheduler", spacing="trailing")


def test_zoo_scheduler_is_built_from_the_trained_schedule():
    """trained_betas from the model's abar and its objective as prediction_type; diffusers' clipping off."""
    abar = NoiseSchedule.cosine().alphas_cumprod
    scheduler = DiffusersSampler(scheduler="UniPCMultistepScheduler", num_steps=10).build(abar, "v")
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.thresholding is False
    assert torch.allclose(scheduler.alphas_cumprod.double(), abar, rtol=1e-5)
    # zero terminal SNR: abar_{T-1} is raised to 2^-24, as diffusers' own rescale_betas_zero_snr does
    zero = NoiseSchedule.cosine(zero_terminal_snr=True).alphas_cumprod
    euler = DiffusersSampler(scheduler="EulerDiscreteScheduler", num_steps=10).build(zero, "v")
    assert euler.alphas_cumprod[-1].item() == pytest.approx(2.0**-24) and torch.isfinite(euler.sigmas).all()
    # PNDM mixes v's of different timesteps in its multistep: it is handed eps, exactly converted
    assert DiffusersSampler(scheduler="PNDMScheduler").build(abar, "v").config.prediction_type == "epsilon"


def test_per_sample_noise_does_not_depend_on_the_batch():
    whole = PerSampleNoise.for_indices(7, range(6)).randn((2, 3))
    parts = torch.cat([PerSampleNoise.for_indices(7, range(0, 4)).randn((2, 3)), PerSampleNoise.for_indices(7, range(4, 6)).randn((2, 3))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, PerSampleNoise.for_indices(8, range(6)).randn((2, 3)))
    assert not torch.equal(whole[0], whole[1])


def test_stochastic_zoo_samples_depend_on_their_own_seed_only():
    """A stochastic diffusers scheduler draws each sample's noise from that sample's generator."""
    abar = NoiseSchedule.linear().alphas_cumprod
    mu, sigma = _gaussian()
    sampler = DiffusersSampler(scheduler="EulerAncestralDiscreteScheduler", num_steps=8)
    whole = sampler(GaussianDenoiser(mu, sigma), abar, PerSampleNoise.for_indices(3, range(6)), (1, 2, 2))
    part = sampler(GaussianDenoiser(mu, sigma), abar, PerSampleNoise.for_indices(3, range(4, 6)), (1, 2, 2))
    assert torch.allclose(whole[4:], part, atol=1e-6)


def test_zoo_configs_cover_the_required_samplers():
    required = {"dpmpp_2m", "unipc", "euler", "euler_ancestral", "heun", "pndm", "deis"}
    assert required <= set(ZOO)
    assert Path(CONF / "sampler" / "ddim.yaml").is_file() and Path(CONF / "sampler" / "ddpm.yaml").is_file()
