"""Prediction targets, loss weightings, the new schedules, zero terminal SNR and the learned variance."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from difflab.objectives import OBJECTIVES, Prediction, loss_weight, objective_target
from difflab.samplers import DDPM, learned_variance
from difflab.schedule import NoiseSchedule, rescale_zero_terminal_snr, sigmoid_betas, snr, step_variances
from tests.conftest import compose

ABAR = {
    "linear": NoiseSchedule.linear().alphas_cumprod,
    "cosine": NoiseSchedule.cosine().alphas_cumprod,
}


@pytest.mark.parametrize("schedule", ABAR)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_conversion_round_trips(schedule, objective):
    """Read a prediction of one objective as each other one and back: the same tensor to 1e-6 (float64)."""
    abar = ABAR[schedule].view(-1, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1000, 1, 2, 2, generator=gen, dtype=torch.float64), torch.randn(1000, 1, 2, 2, generator=gen, dtype=torch.float64)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    truth = {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}
    pred = Prediction(truth[objective], objective, x_t, abar)
    for other in OBJECTIVES:
        assert torch.allclose(pred.as_objective(other), truth[other], rtol=1e-6, atol=1e-6), other
        back = Prediction(pred.as_objective(other), other, x_t, abar).as_objective(objective)
        assert torch.allclose(back, truth[objective], rtol=1e-6, atol=1e-6), other
        assert torch.equal(objective_target(other, x0, eps, abar), truth[other]) or other == "v"
    assert torch.allclose(objective_target("v", x0, eps, abar), truth["v"], atol=1e-12)


def test_min_snr_weights_equal_the_formula_and_tend_to_l_simple():
    """Hang et al. 2023: eps target min(SNR, g)/SNR, x0 target min(SNR, g), v target min(SNR, g)/(SNR + 1)."""
    abar = ABAR["cosine"]
    s = abar / (1 - abar)
    gamma = 5.0
    assert torch.allclose(loss_weight(abar, "eps", "min_snr", gamma), s.clamp(max=gamma) / s)
    assert torch.allclose(loss_weight(abar, "x0", "min_snr", gamma), s.clamp(max=gamma))
    assert torch.allclose(loss_weight(abar, "v", "min_snr", gamma), s.clamp(max=gamma) / (s + 1))
    for objective in OBJECTIVES:  # gamma above every SNR: the eps weighting, i.e. L_simple, in every target
        assert torch.allclose(loss_weight(abar, objective, "min_snr", 1e12), loss_weight(abar, objective, "eps"))
        assert torch.equal(loss_weight(abar, objective, "uniform"), torch.ones_like(abar))
    assert torch.allclose(loss_weight(abar, "eps", "min_snr", 1e12), torch.ones_like(abar))
    with pytest.raises(ValueError, match="allowed: uniform, eps, x0, v, min_snr"):
        loss_weight(abar, "eps", "p2")


@pytest.mark.parametrize("weighting", ["eps", "x0", "v", "min_snr"])
def test_a_weighting_makes_every_objective_the_same_loss(weighting):
    """w_obj ||target_obj - pred_obj||^2 is one number whichever objective the same prediction is trained in."""
    abar = ABAR["linear"][torch.tensor([5, 100, 500, 900, 999])].view(-1, 1, 1, 1)
    gen = torch.Generator().manual_seed(1)
    x0, eps, x0_hat = (torch.randn(5, 1, 3, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    pred = Prediction(x0_hat, "x0", x_t, abar)
    losses = []
    for objective in OBJECTIVES:
        err = (objective_target(objective, x0, eps, abar) - pred.as_objective(objective)).square().flatten(1).mean(1)
        losses.append(loss_weight(abar.flatten(), objective, weighting) * err)
    assert torch.allclose(losses[0], losses[1], rtol=1e-8) and torch.allclose(losses[0], losses[2], rtol=1e-8)


def test_zero_terminal_snr_follows_lin_et_al_algorithm_1():
    betas = NoiseSchedule.linear().betas
    rescaled = NoiseSchedule(betas, zero_terminal_snr=True)
    abar, new = NoiseSchedule(betas).alphas_cumprod, rescaled.alphas_cumprod
    assert new[-1].item() == 0.0 and rescaled.zero_terminal_snr and rescaled.betas[-1].item() == 1.0
    assert new[0].item() == pytest.approx(abar[0].item(), rel=1e-12)
    # sqrt(abar) is mapped linearly: sqrt(abar') = a sqrt(abar) + b with a, b from the two ends
    a = (new[0].sqrt() - new[-1].sqrt()) / (abar[0].sqrt() - abar[-1].sqrt())
    b = new[0].sqrt() - a * abar[0].sqrt()
    assert torch.allclose(new.sqrt(), a * abar.sqrt() + b, atol=1e-12)
    assert torch.allclose(rescale_zero_terminal_snr(betas), rescaled.betas)
    # diffusers' own implementation as an oracle
    theirs = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True)
    assert torch.allclose(theirs.betas.double(), rescaled.betas, atol=1e-6)
    assert snr(new)[-1].item() == 0.0


def test_zero_terminal_snr_is_refused_with_eps():
    from difflab.build import build_module

    cfg = compose("train", ["model=tiny", "dataset.resolution=8", "schedule.zero_terminal_snr=true", "objective=eps",
                            "output_dir=/unused"])
    with pytest.raises(ValueError, match="zero_terminal_snr=true needs objective=v"):
        build_module(cfg)
    cfg = compose("train", ["model=tiny", "dataset.resolution=8", "schedule.zero_terminal_snr=true", "objective=v", "output_dir=/unused"])
    assert build_module(cfg).schedule.alphas_cumprod[-1] == 0


def test_sigmoid_schedule_matches_chen_2023():
    """abar(s) = (sigmoid(end/tau) - sigmoid((s(end - start) + start)/tau)) / (sigmoid(end/tau) - sigmoid(start/tau))."""
    start, end, tau, T = -3.0, 3.0, 1.0, 1000

    def gamma(s):
        sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
        return (sig(end / tau) - sig((s * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))

    abar = torch.cumprod(1 - sigmoid_betas(T, start, end, tau), 0)
    for t in [0, 1, 250, 500, 900]:
        assert abar[t].item() == pytest.approx(gamma((t + 1) / T), rel=1e-9)


def test_scaled_linear_matches_diffusers():
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(NoiseSchedule.scaled_linear().betas, theirs.betas.double(), rtol=1e-6)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "sigmoid"])
def test_every_schedule_config_builds(name):
    from hydra.utils import instantiate

    sched = instantiate(compose("train", [f"schedule={name}"]).schedule)
    assert sched.num_timesteps == 1000 and 0 < sched.alphas_cumprod[-1] < sched.alphas_cumprod[0] < 1


def test_learned_variance_at_its_ends_is_beta_tilde_and_beta():
    """nu = 0 gives beta~, nu = 1 gives beta, exactly, on every step of a respaced grid (the last clipped)."""
    abar = ABAR["cosine"]
    sampler = DDPM(num_steps=10, variance="learned")
    pairs = sampler.pairs(1000)
    beta, beta_tilde, clipped = step_variances(abar, pairs)
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    for frac, expected in ((0.0, clipped), (1.0, beta)):
        pred = Prediction(x, "eps", x, abar[:2].view(-1, 1, 1, 1), torch.full_like(x, frac))
        for i in range(len(pairs)):
            got = sampler.sigma2(pred, beta[i], beta_tilde[i], clipped[i])
            assert torch.allclose(got, expected[i].expand_as(x), rtol=1e-12)
    assert torch.equal(clipped[:-1], beta_tilde[:-1]) and clipped[-1] == beta_tilde[-2] and beta_tilde[-1] == 0
    half = learned_variance(torch.full((1,), 0.5, dtype=torch.float64), beta[3], beta_tilde[3])
    assert half.item() == pytest.approx((beta[3] * beta_tilde[3]).sqrt().item(), rel=1e-12)


def test_learned_variance_sampling_reproduces_the_fixed_variances():
    """DDPM sampling with nu fixed at 0 (1) equals sampling with variance=beta_tilde (beta), bit for bit up to rounding."""
    from difflab.seeding import PerSampleNoise

    abar = ABAR["linear"]

    def model(frac):
        return lambda x, t, a, y: Prediction(0.2 * x, "eps", x, a.view(-1, 1, 1, 1), None if frac is None else torch.full_like(x, frac))

    noise = lambda: PerSampleNoise.for_indices(0, range(4))  # noqa: E731
    for frac, fixed in ((0.0, "beta_tilde"), (1.0, "beta")):
        learned = DDPM(num_steps=20, variance="auto")(model(frac), abar, noise(), (1, 3, 3))
        reference = DDPM(num_steps=20, variance=fixed)(model(None), abar, noise(), (1, 3, 3))
        assert torch.allclose(learned, reference, atol=1e-5)
    with pytest.raises(ValueError, match="variance=learned needs a model trained with a learned variance"):
        DDPM(num_steps=2, variance="learned")(model(None), abar, noise(), (1, 3, 3))


def test_hybrid_loss_backpropagates_the_vlb_only_into_the_variance_channel():
    from difflab.build import build_module

    cfg = compose("train", ["model=tiny", "dataset.resolution=8", "loss=hybrid", "objective=eps", "output_dir=/unused"])
    module = build_module(cfg)  # L_hybrid as Nichol & Dhariwal define it, on eps
    assert module.net.unet.config.out_channels == 2 and module.net.learn_variance
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1
    t = torch.tensor([0, 1, 10, 300, 700, 999])
    abar = module.schedule.abar(t, 4)
    x_t = abar.sqrt().float() * x0 + (1 - abar).sqrt().float() * torch.randn(6, 1, 8, 8, generator=gen)
    output = torch.randn(6, 2, 8, 8, generator=gen, requires_grad=True)
    pred = module.denoiser(module.net).read(output, x_t, abar.flatten())
    vlb = module.vlb(x0, pred.with_output(pred.output.detach()), t)
    assert vlb.shape == (6,) and torch.isfinite(vlb).all() and (vlb > 0).all()
    vlb.sum().backward()
    assert output.grad[:, :1].abs().max() == 0  # the mean's channel: stopped
    assert output.grad[:, 1:].abs().min() > 0  # the variance channel: trained by the VLB
    # and the whole hybrid loss trains both
    losses, _, _ = module.losses(x0, module.net, generator=torch.Generator().manual_seed(1))
    losses.mean().backward()
    assert all(p.grad is not None for p in module.net.parameters() if p.requires_grad)


def test_loss_aware_timestep_sampling_is_unbiased():
    """E[w(t) L_t] under p equals the uniform mean of L_t, and p follows sqrt(E[L_t^2])."""
    from difflab.timestep_sampling import TimestepSampler

    sampler = TimestepSampler(10, "loss_aware", history=3, uniform_prob=0.0)
    losses_per_t = torch.arange(1, 11, dtype=torch.float64)
    for _ in range(3):
        sampler.update(torch.arange(10), losses_per_t)
    p = sampler.probabilities()
    assert torch.allclose(p, losses_per_t / losses_per_t.sum())
    t, w = sampler.sample(200_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    estimate = (w.double() * losses_per_t[t]).mean()
    assert estimate.item() == pytest.approx(losses_per_t.mean().item(), rel=0.01)
    assert set(sampler.state_dict()) == {"losses", "counts"}  # the history travels in checkpoints


def test_self_conditioning_feeds_the_previous_estimate():
    """Chen et al. 2022: the UNet sees [x_t, x0_hat]; x0_hat is zeros at the first step, then the previous estimate."""
    from difflab.denoiser import PredictionDenoiser
    from difflab.build import build_module

    module = build_module(compose("train", ["model=tiny", "dataset.resolution=8", "model.net.self_condition=true",
                                            "output_dir=/unused"]))
    assert module.net.unet.config.in_channels == 2 and module.net.sample_shape == (1, 8, 8)
    seen = []
    module.net.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, 1:].clone()))
    denoiser = PredictionDenoiser(module.net, "eps")
    x, t, abar = torch.randn(2, 1, 8, 8), torch.tensor([500, 500]), module.schedule.alphas_cumprod[[500, 500]]
    with torch.no_grad():
        first = denoiser(x, t, abar, None)
        denoiser(x, t, abar, None)
    assert seen[0].abs().max() == 0 and torch.equal(seen[1], first.x0)
    # training: half the steps condition on a first, gradient-free estimate (two forwards), half on zeros (one)
    seen.clear()
    calls = []
    for i in range(20):
        before = len(seen)
        losses, _, _ = module.losses(torch.rand(4, 1, 8, 8), module.net, generator=torch.Generator().manual_seed(i))
        calls.append(len(seen) - before)
        assert torch.isfinite(losses).all()
    assert set(calls) == {1, 2} and 4 <= calls.count(2) <= 16
    from difflab.samplers import DDIM

    assert torch.isfinite(module.generate(DDIM(num_steps=4), 3)).all()
