"""Shaped noise in training and sampling: iid is bit-identical, shaped steps match diffusers on whitened samples,
the exact shaped denoiser recovers the data Gaussian through difflab's own samplers, checkpoints carry the fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from difflab.build import build_module, load_checkpoint
from difflab.denoiser import PredictionDenoiser
from difflab.errors import ConfigError
from difflab.noise import CovarianceNoise, ShapedNoise, load_noise
from difflab.objectives import Prediction
from difflab.samplers import DDIM, DDPM, step_pairs, timestep_grid
from difflab.seeding import PerSampleNoise
from difflab.tasks import train
from tests.conftest import TINY_TRAIN, compose, run_script
from tests.test_noise import (
    DIGITS,
    dense_root,
    ddim_output_covariance,
    exact_denoiser,
    fitted,
    gaussian_kl_per_dim,
    linear_abar,
    trailing_grid,
)

TINY = ["model=tiny", "dataset.resolution=8", "output_dir=/unused"]


def _module(*overrides: str):
    return build_module(compose("train", [*TINY, *overrides]))


def test_iid_noise_is_bit_identical_to_plain_ddpm():
    """q_sample, the loss and DDPM / DDIM samples with noise=iid equal the plain formulas bit for bit."""
    module = _module("noise=iid", "objective=eps")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 8, 8, generator=gen) * 2 - 1
    losses, t, _ = module.losses(x0, module.net, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # the same draws, in the same order, by hand
    t_plain = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = module.schedule.q_sample(x0, t_plain, eps)
    with torch.no_grad():
        plain = (eps - module.net(x_t, t_plain)).square().flatten(1).mean(1)
    assert torch.equal(t, t_plain) and torch.equal(losses.detach(), plain)
    for sampler in (DDPM(num_steps=5), DDIM(num_steps=5), DDIM(num_steps=5, eta=1.0)):
        ours = module.generate(sampler, 4, seed=2)
        bare = sampler(PredictionDenoiser(module.ema.module.eval(), "eps"), module.schedule.alphas_cumprod,
                       PerSampleNoise.for_indices(2, range(4)), (1, 8, 8))
        assert torch.equal(ours, bare)


def test_dense_noise_with_identity_covariance_matches_iid():
    iid = _module("noise=iid")
    dense = _module("noise=covariance", "noise.power=0", "noise.scale=unit_trace", "noise.center=false")
    dense.noise.fit(DIGITS.split(64))  # power 0 and unit trace: C = I whatever the data
    dense.load_state_dict(iid.state_dict(), strict=False)  # the same network weights
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    a = iid.losses(x0, iid.net, generator=torch.Generator().manual_seed(3))[0]
    b = dense.losses(x0, dense.net, generator=torch.Generator().manual_seed(3))[0]
    assert (a - b).abs().max() <= 1e-6
    for sampler in (DDPM(num_steps=5), DDIM(num_steps=5)):
        assert (iid.generate(sampler, 4, seed=4) - dense.generate(sampler, 4, seed=4)).abs().max() <= 1e-6


def test_data_space_loss_and_prediction_are_the_white_ones_for_iid_noise():
    """loss.space=data and prediction_space=data change nothing for iid noise (A = I): bit-identical losses."""
    plain, data = _module("noise=iid"), _module("noise=iid", "loss.space=data", "prediction_space=data")
    data.load_state_dict(plain.state_dict())
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    a = plain.losses(x0, plain.net, generator=torch.Generator().manual_seed(3))[0]
    b = data.losses(x0, data.net, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("prediction_space", ["white", "data"])
def test_data_space_loss_is_the_coloured_error(prediction_space):
    """loss.space=data: ||A (z - z_hat)||^2 n / tr C per sample, z_hat read in either prediction space."""
    module = _module("noise=covariance", "objective=eps", "loss.space=data", f"prediction_space={prediction_space}")
    module.noise.fit(DIGITS.split(64))
    x0 = DIGITS[:8].float()
    losses, t, _ = module.losses(x0, module.net, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same draws by hand, in float64
    t_hand = torch.randint(0, 1000, (8,), generator=g)
    z = torch.randn(x0.shape, generator=g).double()
    y0 = module.noise.from_data(x0).double()
    abar = module.schedule.alphas_cumprod[t_hand].double().view(-1, 1, 1, 1)
    y_t = abar.sqrt() * y0 + (1 - abar).sqrt() * z
    with torch.no_grad():
        out = module.net(module.noise.color(y_t.float()), t_hand).double()
    a = dense_root(module.noise)
    z_hat = out if prediction_space == "white" else torch.linalg.solve(a, out.flatten(1).T).T.view(out.shape)
    err = ((z - z_hat).flatten(1) @ a.T) * math.sqrt(64 / module.noise.trace().item())
    assert torch.equal(t, t_hand)
    torch.testing.assert_close(losses.detach().double(), err.square().mean(1), rtol=1e-4, atol=1e-6)
    # the white loss of the same draws weighs every direction alike: another number
    white = _module("noise=covariance", "objective=eps", f"prediction_space={prediction_space}")
    white.load_state_dict(module.state_dict())
    other = white.losses(x0, white.net, generator=torch.Generator().manual_seed(5))[0].detach()
    assert (other.double() - err.square().mean(1)).abs().max() > 1e-3


def test_data_prediction_space_reads_the_output_through_a_inverse():
    """prediction_space=data: the sampler's white z_hat is A^-1 of the UNet's output, so A z_hat is that output."""
    module = _module("noise=covariance", "objective=eps", "prediction_space=data")
    module.noise.fit(DIGITS.split(64))
    y_t, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900])
    abar = module.schedule.alphas_cumprod[t].float()
    pred = module.denoiser(module.net)(y_t, t, abar, None)
    with torch.no_grad():
        raw = module.net(module.noise.color(y_t), t)
    torch.testing.assert_close(module.noise.color(pred.eps), raw, rtol=1e-4, atol=1e-5)
    assert (pred.eps - raw).abs().max() > 1e-2  # not the identity: A is far from I on the digits


def test_noise_trace_is_the_covariance_trace():
    """trace() (from the parameters) equals tr covariance() for every option."""
    for option in ("iid", "offset", "covariance", "lowrank", "spectral"):
        noise = _module(f"noise={option}").noise
        if noise.requires_fit:
            noise.fit(DIGITS.split(64))
        torch.testing.assert_close(noise.trace(), noise.covariance().trace(), rtol=1e-10, atol=1e-10)


class FixedNoise:
    """A noise source handing out given tensors: the sampler's x_T, then each step's z."""

    def __init__(self, draws: list[torch.Tensor]) -> None:
        self.draws, self.device, self.generators = list(draws), torch.device("cpu"), None

    def randn(self, shape, dtype=torch.float64):
        return self.draws.pop(0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_shaped_ddim_step_equals_a_times_diffusers_on_the_whitened_sample(eta):
    """x' = A DDIMScheduler.step(z_theta(x_t), t, A^-1 x_t, variance_noise=xi): difflab's whitened run, step by step."""
    noise = fitted("covariance")
    module = _module("noise=covariance", "objective=eps")
    module.noise.load_state_dict(noise.state_dict())
    module.double()
    abar = module.schedule.alphas_cumprod
    theirs = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    theirs.set_timesteps(50)
    theirs.alphas_cumprod = abar
    a = dense_root(noise)
    pairs = step_pairs(timestep_grid(1000, 50, "leading"))
    gen = torch.Generator().manual_seed(5)
    for i in (0, 1, 25, 48):
        x_t = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)  # a (centred) shaped-space state
        xi = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
        y_t = noise.whiten(x_t)
        stepper = DDIM(num_steps=50, spacing="leading", eta=eta).stepper(abar, FixedNoise([xi]))
        t = torch.full((3,), pairs[i][0])
        with torch.no_grad():
            pred = module.denoiser(module.net)(y_t, t, abar[t], None)
            ours = noise.color(stepper.step(i, y_t, pred))
            z_theta = module.net(x_t, t)  # the network sees x_t and predicts the white z
        expected = theirs.step(z_theta, pairs[i][0], (x_t.flatten(1) @ torch.linalg.inv(a).T).view_as(x_t), eta=eta,
                               variance_noise=xi).prev_sample
        assert torch.allclose(ours, (expected.flatten(1) @ a.T).view_as(x_t), atol=1e-5), i


def _exact_y_denoiser(sigma: torch.Tensor, data_mean: torch.Tensor, noise: ShapedNoise):
    """pred(y_t) = E[z | x_t = A y_t], the issue's exact shaped denoiser, as the samplers see it (whitened state)."""
    cache: dict[float, object] = {}

    def denoiser(y_t, t, abar_t, y):
        key = float(abar_t[0])
        if key not in cache:
            cache[key] = exact_denoiser(sigma, data_mean, noise, abar_t[0])
        z = cache[key](noise.color(y_t))
        return Prediction(z, "eps", y_t, abar_t.view(-1, 1, 1, 1))

    return denoiser


def test_ddpm_1000_with_the_exact_shaped_denoiser_recovers_sigma():
    """Data N(m, Sigma) (Sigma: the digits'), spectral noise C != Sigma, mu = 0: difflab's DDPM-1000 on whitened y,
    mapped back by x = A y, has covariance Sigma within 3 sqrt((PR + 1) / N) (relative Frobenius)."""
    sigma, data_mean = fitted("covariance").covariance(), fitted("covariance").mean
    noise = fitted("spectral", center=False)
    n = 2000  # measured relative error 0.08 against a tolerance of 0.25 (0.046 vs 0.146 at N = 6000)
    y0 = DDPM()(_exact_y_denoiser(sigma, data_mean, noise), linear_abar(), FixedNoiseStream(n), (1, 8, 8))
    x0 = noise.to_data(y0).flatten(1)
    lam = torch.linalg.eigvalsh(sigma).clamp(min=0)
    pr = float(lam.sum() ** 2 / (lam**2).sum())
    err = torch.linalg.matrix_norm(torch.cov(x0.T) - sigma) / torch.linalg.matrix_norm(sigma)
    assert err <= 3 * math.sqrt((pr + 1) / n), (float(err), pr)
    assert (x0.mean(0) - data_mean.flatten()).abs().max() <= 5 * (sigma.diag().max() / n).sqrt() + 0.01


class FixedNoiseStream:
    """One float64 generator for the whole batch (statistics only)."""

    def __init__(self, n: int, seed: int = 6) -> None:
        self.n, self.generators, self.device = n, torch.Generator().manual_seed(seed), torch.device("cpu")

    def randn(self, shape, dtype=torch.float64):
        return torch.randn((self.n, *shape), generator=self.generators, dtype=torch.float64)


def test_ddim_50_through_difflab_is_the_exact_linear_map():
    """With C = Sigma, DDIM-50 (eta = 0) is linear in y_T: difflab's sampler, run on the basis, gives the exact output
    covariance; its KL to the data Gaussian per dimension is <= 5e-3 and below a tenth of iid noise's."""
    sigma, data_mean = fitted("covariance").covariance(), fitted("covariance").mean
    abar, steps = linear_abar(), trailing_grid(1000, 50)
    kls = {}
    for name, noise in (("shaped", fitted("covariance")), ("iid", fitted("iid"))):
        basis = torch.cat([torch.zeros(1, 64, dtype=torch.float64), torch.eye(64, dtype=torch.float64)]).view(65, 1, 8, 8)
        out = DDIM(num_steps=50)(_exact_y_denoiser(sigma, data_mean, noise), abar, FixedNoise([basis]), (1, 8, 8))
        m = (out[1:] - out[:1]).flatten(1).T  # y_0 = m y_T + c
        a = dense_root(noise)
        cov = a @ m @ m.T @ a.T
        assert torch.allclose(cov, ddim_output_covariance(sigma, noise, abar, steps), atol=1e-8)
        kls[name] = gaussian_kl_per_dim(cov, sigma)
    assert kls["shaped"] <= 5e-3 and kls["shaped"] < kls["iid"] / 10, kls


@pytest.fixture(scope="module")
def covariance_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("noise") / "run"
    train(compose("train", [*TINY_TRAIN, "noise=covariance", f"output_dir={run_dir}"]))
    return run_dir


def test_the_fit_travels_with_the_checkpoint_and_is_never_refit(covariance_run, monkeypatch, tmp_path):
    saved = load_noise(covariance_run / "noise.safetensors")
    module = load_checkpoint(covariance_run)
    assert isinstance(module.noise, CovarianceNoise) and module.noise.fitted
    z = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(module.noise.color(z), saved.color(z))
    assert int(module.noise.fit_count) == 1617  # the whole training split, once

    def refit(*args, **kwargs):
        raise AssertionError("sampling must not refit the noise")

    monkeypatch.setattr(ShapedNoise, "fit", refit)
    from difflab.tasks import sample

    out = sample(compose("sample", [f"ckpt={covariance_run}", "num_samples=4", "sampler.num_steps=3", "progress=false",
                                    f"output_dir={tmp_path}"]))
    assert out["images"].shape == (4, 8, 8, 1)


def test_classifier_guidance_and_cfg_run_with_shaped_noise(covariance_run):
    module = load_checkpoint(covariance_run)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    images = module.generate(DDPM(num_steps=4), 3, labels=torch.tensor([0, 1, 2]), classifier=lambda x, t: clf(x),
                             classifier_scale=2.0)
    assert torch.isfinite(images).all()


def test_bad_shaped_noise_inputs_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"noise=covariance .* 5 n = 5120 .*1617"):
        train(compose("train", [*TINY_TRAIN, "dataset.resolution=32", "noise=covariance", f"output_dir={tmp_path / 'a'}"]))
    with pytest.raises(ConfigError, match="sampler.clip_x0 cannot be used with noise=spectral"):
        train(compose("train", [*TINY_TRAIN, "noise=spectral", "sampler.clip_x0=true", f"output_dir={tmp_path / 'b'}"]))
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()


def test_sample_refuses_thresholding_on_a_shaped_model(covariance_run, tmp_path):
    from difflab.tasks import sample

    with pytest.raises(ConfigError, match="sampler.dynamic_threshold cannot be used with noise=covariance"):
        sample(compose("sample", [f"ckpt={covariance_run}", "sampler.dynamic_threshold=0.995", f"output_dir={tmp_path}"]))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_train_and_sample_py_with_spectral_noise(tmp_path):
    run_dir = tmp_path / "run"
    run_script("train.py", *TINY_TRAIN, "noise=spectral", f"hydra.run.dir={run_dir}")
    assert (run_dir / "noise.safetensors").is_file()
    run_script("sample.py", f"ckpt={run_dir}", "num_samples=4", "progress=false", f"out_dir={tmp_path / 's'}")
    arr = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert arr.shape == (4, 8, 8, 1) and arr.std() > 0
