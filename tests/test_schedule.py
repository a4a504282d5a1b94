"""The forward-process math against closed forms, Bayes' rule and published constants."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.schedule import NoiseSchedule, cosine_betas, linear_betas


def test_linear_schedule_matches_ho_et_al():
    betas = linear_betas()
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64), atol=1e-15)
    abar = NoiseSchedule(betas).alphas_cumprod.double()
    # abar_{T-1} for the linear schedule: 4.04e-5 (Ho et al. 2020 report L_T ~ 1e-5 bits/dim from it)
    assert abar[-1].item() == pytest.approx(torch.prod(1 - betas).item(), rel=1e-5)
    assert abar[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_cosine_schedule_matches_the_abar_formula_where_unclipped():
    T, s = 1000, 0.008
    betas = cosine_betas(T, s)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    abar = torch.cumprod(1 - betas, 0)
    unclipped = int((betas < 0.999).sum())
    assert unclipped >= 990 and bool((betas[:unclipped] < 0.999).all())
    for t in [0, 1, 10, 100, 500, 900, unclipped - 1]:
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert betas.max().item() == pytest.approx(0.999)
    assert betas[0].item() == pytest.approx(1 - f(1) / f(0), rel=1e-12)


def test_q_sample_equals_iterating_the_one_step_chain():
    """x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps_t, iterated: mean coefficient and variance exactly."""
    for sched in (NoiseSchedule.linear(), NoiseSchedule.cosine()):
        betas = sched.betas.double()
        mean_coef, var = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        mean_coefs, variances = [], []
        for beta in betas:
            mean_coef = mean_coef * (1 - beta).sqrt()
            var = (1 - beta) * var + beta
            mean_coefs.append(mean_coef)
            variances.append(var)
        t = torch.arange(1000)
        one, zero = torch.ones(1000), torch.zeros(1000)
        # q_sample is linear in (x0, eps): its coefficients are the mean coefficient and the std.
        assert torch.allclose(sched.q_sample(one, t, zero).double(), torch.stack(mean_coefs), rtol=1e-5, atol=1e-7)
        assert torch.allclose(sched.q_sample(zero, t, one).double() ** 2, torch.stack(variances), rtol=1e-5, atol=1e-7)


def test_posterior_equals_bayes_rule_computed_numerically():
    """q(x_{t-1}|x_t, x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0), normalised on a fine grid."""
    sched = NoiseSchedule.cosine()
    gen = torch.Generator().manual_seed(0)
    abar = sched.alphas_cumprod.double()
    for t in [1, 5, 50, 300, 700, 990]:
        x0 = torch.randn((), generator=gen, dtype=torch.float64)  # x0 from a Gaussian
        alpha_t = abar[t] / abar[t - 1]
        x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * torch.randn((), generator=gen, dtype=torch.float64)
        prior_mean, prior_var = abar[t - 1].sqrt() * x0, 1 - abar[t - 1]
        grid = torch.linspace(prior_mean - 12 * prior_var.sqrt(), prior_mean + 12 * prior_var.sqrt(), 400_001, dtype=torch.float64)
        log_p = -((grid - prior_mean) ** 2) / (2 * prior_var) - (x_t - alpha_t.sqrt() * grid) ** 2 / (2 * (1 - alpha_t))
        w = torch.softmax(log_p, 0)
        bayes_mean = (w * grid).sum()
        bayes_var = (w * (grid - bayes_mean) ** 2).sum()
        mean, var = sched.q_posterior(x0[None], x_t[None], torch.tensor([t]))
        assert mean.item() == pytest.approx(bayes_mean.item(), rel=1e-7, abs=1e-9)
        assert var.item() == pytest.approx(bayes_var.item(), rel=1e-6)
        assert var.item() == pytest.approx(sched.posterior_variance[t].item(), rel=1e-12)


def test_eps_mean_equals_posterior_mean_for_the_true_noise():
    sched = NoiseSchedule.linear()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(1000, 3, generator=gen)
    eps = torch.randn(1000, 3, generator=gen)
    t = torch.arange(1000)
    x_t = sched.q_sample(x0, t, eps)
    posterior_mean, _ = sched.q_posterior(x0, x_t, t)
    assert torch.allclose(sched.p_mean(x_t, t, eps), posterior_mean, rtol=1e-4, atol=1e-4)
    assert torch.allclose(sched.predict_x0_from_eps(x_t, t[:, None], eps)[:100], x0[:100], atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta_start": 0.02, "beta_end": 1e-4}, "0 < beta_start < beta_end < 1"),
        ({"beta_start": 1e-4, "beta_end": 1.5}, "beta_end=1.5"),
        ({"beta_start": -1e-4}, "beta_start=-0.0001"),
        ({"num_timesteps": 1}, "T >= 2, got T=1"),
    ],
)
def test_bad_linear_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        NoiseSchedule.linear(**kwargs)


def test_coefficients_are_float64_but_outputs_keep_the_data_dtype():
    sched = NoiseSchedule.linear()
    assert sched.alphas_cumprod.dtype == torch.float64
    assert sched.state_dict() == {}  # rebuilt from config, never a stale copy in a checkpoint
    x = torch.ones(2, 1, 2, 2)
    t = torch.tensor([0, 1])
    assert sched.q_sample(x, t, x).dtype == torch.float32
    assert sched.p_mean(x, t, x).dtype == torch.float32
    # float32 abar would lose ~1e-3 of beta~_1's relative precision; float64 keeps it exact
    abar32 = sched.alphas_cumprod.float()
    beta_tilde_1_f32 = (1 - abar32[0]) / (1 - abar32[1]) * (1 - abar32[1] / abar32[0])
    exact = (1 - sched.alphas_cumprod[0]) / (1 - sched.alphas_cumprod[1]) * sched.betas[1]
    assert sched.posterior_variance[1].item() == pytest.approx(exact.item(), rel=1e-12)
    assert abs(beta_tilde_1_f32.item() / exact.item() - 1) > 1e-5
