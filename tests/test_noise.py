"""Shaped noise eps = A z: every model's A against its covariance, the knobs, persistence, errors and the report.

Fits use the native 8x8 digits (n = 64, 1,797 images: >= 5 n for the dense model) and 8x8 RGB patches
of scikit-learn's two bundled photos (n = 192), so every eigendecomposition here is small and fast.
"""

from __future__ import annotations

import functools
import json
import math
import pickle

import numpy as np
import pytest
import scipy.fft
import torch
from hydra.utils import instantiate
from PIL import Image
from sklearn.datasets import load_sample_images

from difflab.data import digits_tensor
from difflab.errors import ConfigError
from difflab.noise import (
    NOISES,
    CovarianceNoise,
    IIDNoise,
    LowRankNoise,
    ShapedNoise,
    SpectralNoise,
    effective_rank,
    load_noise,
    participation_ratio,
    shape_spectrum,
)
from difflab.noise.gaussian import dense_root, exact_denoiser, exact_denoiser_matrix
from difflab.noise.statistics import dct_matrix
from tests.conftest import compose

DIGITS = digits_tensor(8)[0]  # (1797, 1, 8, 8) in [-1, 1]


def rgb_patches(size: int = 8, count: int = 1200, seed: int = 0) -> torch.Tensor:
    """Random size x size crops of the two bundled 427 x 640 photos, (count, 3, size, size) in [-1, 1]."""
    gen, crops = torch.Generator().manual_seed(seed), []
    for photo in load_sample_images().images:
        image = torch.tensor(photo).permute(2, 0, 1).float() / 127.5 - 1
        tops = torch.randint(0, image.shape[1] - size, (count // 2,), generator=gen).tolist()
        lefts = torch.randint(0, image.shape[2] - size, (count // 2,), generator=gen).tolist()
        crops += [image[:, t : t + size, s : s + size] for t, s in zip(tops, lefts)]
    return torch.stack(crops)


DATA = {"digits": DIGITS, "rgb": rgb_patches()}


@functools.cache
def fitted(name: str, data: str = "digits", **knobs) -> ShapedNoise:
    """``noise=name`` fitted on ``DATA[data]`` in batches of 64 (cached: tests only read it)."""
    x = DATA[data]
    return NOISES[name](tuple(x.shape[1:]), **knobs).fit(x.split(64))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def whitened_pr_fraction(noise: ShapedNoise, x: torch.Tensor) -> float:
    """PR of the whitened data's covariance A^-1 Sigma A^-T over n: 1 when the noise whitens the data exactly."""
    w = noise.whiten(x.double()).flatten(1)
    return participation_ratio(torch.linalg.eigvalsh(torch.cov(w.T))) / noise.dim


# -- the analytic Gaussian (pure torch, independent of the samplers' code) --------------------------------------
# For data x0 ~ N(m, Sigma) and the shaped forward process x_t = sqrt(abar) (x0 - mu) + sqrt(1 - abar) A z, the
# exact denoiser (difflab.noise.gaussian) is linear: z_hat = sqrt(1 - abar) A^T M^-1 (x_t - sqrt(abar) (m - mu)), M = abar Sigma + (1 - abar) C.
# So DDIM with eta = 0 run on y = A^-1 x with y -> z_hat(A y) is a linear map and its output covariance is exact.


def linear_abar(num_timesteps: int = 1000) -> torch.Tensor:
    """abar_t of the linear schedule, beta from 1e-4 to 0.02 (Ho et al. 2020), float64 (T,)."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, num_timesteps, dtype=torch.float64), 0)


def trailing_grid(num_timesteps: int, num_steps: int) -> list[int]:
    """Timesteps T - 1, ..., of a ``trailing`` grid (diffusers' spacing), descending."""
    return [round(num_timesteps - i * num_timesteps / num_steps) - 1 for i in range(num_steps)]


def ddim_output_covariance(
    sigma: torch.Tensor, noise: ShapedNoise, abar: torch.Tensor, steps: list[int]
) -> torch.Tensor:
    """The exact covariance (n, n) of x0 = A y_0 after DDIM (eta = 0, Song et al. 2021 eq. 12) on y from y_T ~ N(0, I).

    Each step y_t' = sqrt(abar_t') y0_hat + sqrt(1 - abar_t') z_hat with y0_hat = (y_t - sqrt(1 - abar_t) z_hat) /
    sqrt(abar_t) and z_hat = K A y_t (+ a constant), i.e. y_t' = S_t y_t + const.
    """
    a, c = dense_root(noise), noise.covariance()
    eye = torch.eye(noise.dim, dtype=torch.float64)
    total = eye
    for t, t_prev in zip(steps, [*steps[1:], -1]):
        ab, ab_prev = abar[t], (abar[t_prev] if t_prev >= 0 else torch.ones((), dtype=torch.float64))
        eps = exact_denoiser_matrix(sigma, a, c, ab) @ a
        total = ((ab_prev / ab).sqrt() * (eye - (1 - ab).sqrt() * eps) + (1 - ab_prev).sqrt() * eps) @ total
    return a @ total @ total.T @ a.T


def gaussian_kl_per_dim(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(N(0, p) || N(0, q)) / n for covariances (n, n)."""
    n = p.shape[0]
    trace = torch.trace(torch.linalg.solve(q, p))
    return 0.5 * float(trace - n + torch.linalg.slogdet(q)[1] - torch.linalg.slogdet(p)[1]) / n


@pytest.mark.parametrize("abar", [0.9, 0.1])
def test_exact_shaped_denoiser_is_the_posterior_mean(abar):
    # data N(m, Sigma) with Sigma the (floored) digits covariance; spectral noise without centring, so C != Sigma
    # and mu = 0 != m. The mean squared error of E[z | x_t] is n - (1 - abar) tr(A^T M^-1 A), and its estimate
    # over N draws has standard deviation sqrt(2 tr(P^2) / N), P = Cov(z | x_t).
    sigma, data_mean = fitted("covariance").covariance(), fitted("covariance").mean
    noise, abar, n_draws = fitted("spectral", center=False), torch.tensor(abar, dtype=torch.float64), 20_000
    lam, vec = torch.linalg.eigh(sigma)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(n_draws, 64, generator=gen, dtype=torch.float64)
    x0 = (data_mean.flatten() + (w * lam.clamp(min=0).sqrt()) @ vec.T).view(n_draws, 1, 8, 8)
    z = torch.randn(n_draws, 1, 8, 8, generator=gen, dtype=torch.float64)
    x_t = abar.sqrt() * (x0 - noise.mean) + (1 - abar).sqrt() * noise.color(z)
    mse = (z - exact_denoiser(sigma, data_mean, noise, abar)(x_t)).flatten(1).square().sum(1).mean()
    a = dense_root(noise)
    posterior = torch.eye(64, dtype=torch.float64) - (1 - abar) * a.T @ torch.linalg.solve(
        abar * sigma + (1 - abar) * noise.covariance(), a
    )
    assert abs(float(mse - posterior.trace())) <= 4 * math.sqrt(2 * float((posterior @ posterior).trace()) / n_draws)


def test_ddim_with_the_exact_denoiser_recovers_sigma_with_shaped_noise():
    # data N(m, Sigma) with Sigma = C of the dense noise fitted on the digits: whitened data is then exactly white
    sigma, abar, steps = fitted("covariance").covariance(), linear_abar(), trailing_grid(1000, 50)
    shaped = gaussian_kl_per_dim(ddim_output_covariance(sigma, fitted("covariance"), abar, steps), sigma)
    iid = gaussian_kl_per_dim(ddim_output_covariance(sigma, IIDNoise((1, 8, 8)), abar, steps), sigma)
    assert shaped <= 5e-3 and shaped < iid / 10  # measured 0.0013 vs 0.063


def test_dct_matrix_is_scipys_orthonormal_dct_ii():
    for size in (1, 5, 8, 16):
        d = dct_matrix(size)
        assert torch.allclose(d, torch.from_numpy(scipy.fft.dct(np.eye(size), norm="ortho", axis=0)), atol=1e-14)
        assert torch.allclose(d @ d.T, torch.eye(size, dtype=torch.float64), atol=1e-14)


def test_spectrum_measures():
    assert participation_ratio(torch.ones(64)) == pytest.approx(64)
    assert effective_rank(torch.ones(64)) == pytest.approx(64)
    assert participation_ratio(torch.tensor([3.0, 0, 0])) == pytest.approx(1)
    assert effective_rank(torch.tensor([3.0, 0, 0])) == pytest.approx(1)
    # the numbers the issue quotes for the 64-pixel digits
    sigma = torch.cov(DIGITS.flatten(1).double().T)
    assert participation_ratio(torch.linalg.eigvalsh(sigma)) == pytest.approx(13.17, abs=0.01)


@pytest.mark.parametrize("name", ["covariance", "lowrank", "spectral", "offset"])
def test_draws_have_the_target_covariance(name):
    # E||C_hat - C||_F^2 = (tr(C)^2 + tr(C^2)) / N for C_hat = (1/N) sum e e^T of N Gaussian draws, so the
    # relative error is about sqrt((PR + 1) / N); allow 3x. 100,000 draws of the 64-pixel digits.
    noise = fitted(name, strength=0.3) if name == "offset" else fitted(name)
    cov, n_draws = noise.covariance(), 100_000
    z = torch.randn(n_draws, *noise.shape, generator=torch.Generator().manual_seed(0))
    eps = noise.color(z).double().flatten(1)
    pr = participation_ratio(torch.linalg.eigvalsh(cov))
    assert rel(eps.T @ eps / n_draws, cov) <= 3 * math.sqrt((pr + 1) / n_draws)


def test_dense_model_is_the_data_covariance():
    sigma = torch.cov(DIGITS.flatten(1).double().T)
    noise = fitted("covariance")
    assert rel(noise.covariance(), sigma) < 5e-3  # only the 13 eigenvalues under the 1e-2 floor differ
    assert torch.allclose(noise.mean.flatten(), DIGITS.flatten(1).double().mean(0), atol=1e-12)
    assert float(noise.covariance().trace()) == pytest.approx(float(sigma.trace()), rel=1e-12)  # scale=data


@pytest.mark.parametrize("data", ["digits", "rgb"])
@pytest.mark.parametrize("name", list(NOISES))
def test_color_is_a_symmetric_root_of_the_covariance(name, data):
    noise = fitted(name, data)
    a = dense_root(noise)
    assert rel(a @ a.T, noise.covariance()) <= 1e-5
    assert torch.allclose(a, a.T, atol=1e-12)  # the symmetric square root, as eigh gives it
    assert float(noise.log_abs_det()) == pytest.approx(float(torch.linalg.slogdet(a)[1]), rel=1e-8, abs=1e-8)
    z = torch.randn(64, *noise.shape, generator=torch.Generator().manual_seed(1))
    assert (noise.whiten(noise.color(z)) - z).abs().max() <= 1e-5  # float32 in and out
    x = DATA[data][:16]
    assert torch.allclose(noise.to_data(noise.from_data(x)), x, atol=1e-5)


def test_iid_is_untouched():
    noise = IIDNoise((1, 8, 8))
    z = torch.randn(4, 1, 8, 8)
    assert noise.color(z) is z and noise.whiten(z) is z and noise.to_data(z) is z and noise.from_data(z) is z
    assert noise.isotropic and noise.is_identity and not noise.requires_fit and noise.fitted
    assert noise.state_dict() == {}  # adding it to a model changes no checkpoint keys

    def never():
        raise AssertionError("iid noise has nothing to fit and must not read the data")
        yield

    assert noise.fit(never()) is noise


def test_dense_with_identity_covariance_matches_iid():
    noise = fitted("covariance", power=0.0, scale="unit_trace")
    z = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    assert (noise.color(z) - z).abs().max() <= 1e-6
    assert torch.allclose(noise.covariance(), torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert abs(float(noise.log_abs_det())) < 1e-10


def test_knobs_shape_the_spectrum():
    lam = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0, -1e-9], dtype=torch.float64)
    trace = float(lam.clamp(min=0).sum())
    data = shape_spectrum(lam, floor=1e-3, shrinkage=0.0, power=1.0, scale="data")
    assert float(data.sum()) == pytest.approx(trace) and float(data.min()) > 0
    assert torch.allclose(data[:5] / data[0], lam[:5] / lam[0])  # unfloored eigenvalues keep their ratios
    floored = shape_spectrum(lam, floor=0.5, shrinkage=0.0, power=1.0, scale="unit_trace")
    assert float(floored.mean()) == pytest.approx(1.0)
    assert float(floored.min() / floored.max()) == pytest.approx(0.5 * trace / 7 / 8)  # floor relative to the mean
    assert torch.allclose(shape_spectrum(lam, 1e-3, 1.0, 1.0, "unit_trace"), torch.ones(7, dtype=torch.float64))
    assert torch.allclose(shape_spectrum(lam, 1e-3, 0.0, 0.0, "unit_trace"), torch.ones(7, dtype=torch.float64))
    root = shape_spectrum(lam, 1e-3, 0.0, 0.5, "data")
    assert float(root[0] / root[2]) == pytest.approx(2.0)  # power 1/2: sqrt(8 / 2)
    half, mean = shape_spectrum(lam, 1e-3, 0.5, 1.0, "data"), float(data.mean())  # data: floored, same trace
    assert float(half[0] / half[3]) == pytest.approx((float(data[0]) + mean) / (float(data[3]) + mean))
    unit_max = shape_spectrum(lam, 1e-3, 0.0, 1.0, "unit_max")  # the largest eigenvalue 1, the ratios kept
    assert float(unit_max.max()) == 1.0 and torch.allclose(unit_max[:5], lam[:5] / 8)
    # the knobs reach a fitted model: scale=unit_trace gives the noise iid's energy, tr C = n
    assert float(fitted("spectral", scale="unit_trace").covariance().trace()) == pytest.approx(64)
    assert float(torch.linalg.eigvalsh(fitted("covariance", scale="unit_max").covariance()).max()) == pytest.approx(1)


def test_spectral_whitens_better_than_lowrank():
    # Whitened data A^-1 (x - mu) has covariance I when C = Sigma; PR / n measures how close (1 = white).
    # Digits at equal parameter count (spectral: 1 + 64, lowrank k = 1: 64 + 1): 0.344 vs 0.217. RGB patches
    # (nearly stationary) at the default k = 16 (9 + 192 vs 16 * 192 + 1 parameters): 0.40 vs 0.25.
    for data, rank in (("digits", 1), ("rgb", 16)):
        spectral = whitened_pr_fraction(fitted("spectral", data), DATA[data])
        assert spectral > 1.4 * whitened_pr_fraction(fitted("lowrank", data, rank=rank), DATA[data])
    # and the dense model whitens the digits best: PR / n 0.84 (the rest are the 13 floored, near-constant pixels)
    assert whitened_pr_fraction(fitted("covariance"), DIGITS) > 0.8


def test_lowrank_sketch_agrees_with_the_exact_fit():
    exact = fitted("lowrank", rank=4)
    sketch = fitted("lowrank", rank=4, max_exact_dim=10)  # Nystrom sketch of 32 columns instead of the 64 x 64 scatter
    sigma = torch.cov(DIGITS.flatten(1).double().T)
    captured = [float(torch.trace(m.basis.T @ sigma @ m.basis)) for m in (sketch, exact)]
    assert captured[0] >= 0.98 * captured[1]
    assert torch.allclose(sketch.eigenvalues, exact.eigenvalues, rtol=0.1)
    assert float(sketch.complement) == pytest.approx(float(exact.complement), rel=0.05)
    full = fitted("lowrank", rank=8, max_exact_dim=10)  # 64 columns span everything: exact
    assert rel(full.covariance(), fitted("lowrank", rank=8).covariance()) < 1e-8


def test_fit_is_a_pure_streaming_function_of_the_batches():
    one = fitted("covariance")
    again = CovarianceNoise((1, 8, 8)).fit(iter(DIGITS.split(64)))  # a one-shot iterator is enough
    for key, value in one.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    whole = CovarianceNoise((1, 8, 8)).fit([DIGITS])  # Chan's merge of 29 batches equals one pass over all
    assert rel(whole.covariance(), one.covariance()) < 1e-12
    assert int(one.fit_count) == len(DIGITS)
    spectral = fitted("spectral", "rgb")
    assert rel(SpectralNoise((3, 8, 8)).fit([DATA["rgb"]]).covariance(), spectral.covariance()) < 1e-12


@pytest.mark.parametrize("name", ["offset", "covariance", "lowrank", "spectral"])
def test_state_dict_round_trip_needs_no_refit(name):
    noise = fitted(name, center=True)
    fresh = NOISES[name]((1, 8, 8), center=True)
    z = torch.randn(8, 1, 8, 8)
    with pytest.raises(RuntimeError, match="not fitted"):
        fresh.color(z)
    fresh.load_state_dict(noise.state_dict())
    assert torch.equal(fresh.color(z), noise.color(z)) and torch.equal(fresh.to_data(z), noise.to_data(z))
    assert torch.equal(pickle.loads(pickle.dumps(noise)).color(z), noise.color(z))  # ddp_spawn pickles modules


@pytest.mark.parametrize("name", list(NOISES))
def test_run_dir_file_round_trip(name, tmp_path):
    noise = fitted(name, "rgb")
    path = noise.save(tmp_path / "noise.safetensors")
    z = torch.randn(8, 3, 8, 8)
    assert torch.equal(load_noise(path).color(z), noise.color(z))
    assert torch.equal(NOISES[name]((3, 8, 8)).load(path).color(z), noise.color(z))


def test_noise_file_errors(tmp_path):
    path = fitted("lowrank").save(tmp_path / "noise.safetensors")
    with pytest.raises(ConfigError, match="holds noise=lowrank .* not noise=lowrank"):
        LowRankNoise((1, 8, 8), rank=5).load(path)
    with pytest.raises(ConfigError, match="not noise=spectral"):
        SpectralNoise((1, 8, 8)).load(path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot read noise statistics"):
        load_noise(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    ("name", "knobs", "message"),
    [
        ("covariance", {"floor": 0.0}, r"noise.floor must lie in \(0, 1\], got 0.0"),
        ("spectral", {"floor": 1.5}, r"noise.floor must lie in \(0, 1\], got 1.5"),
        ("lowrank", {"shrinkage": -0.1}, r"noise.shrinkage must lie in \[0, 1\], got -0.1"),
        ("covariance", {"power": 2.0}, r"noise.power must lie in \[0, 1\], got 2.0"),
        ("spectral", {"scale": "trace"}, "noise.scale must be one of data, unit_trace, unit_max, got 'trace'"),
        ("lowrank", {"rank": 0}, r"noise.rank must be an integer in \[1, 63\]"),
        ("lowrank", {"rank": 64}, r"noise.rank must be an integer in \[1, 63\]"),
        ("offset", {"strength": -1.0}, "noise.strength .* must be a finite number >= 0, got -1.0"),
    ],
)
def test_bad_knobs_are_config_errors(name, knobs, message):
    with pytest.raises(ConfigError, match=message):
        NOISES[name]((1, 8, 8), **knobs)


def test_shape_and_size_errors():
    with pytest.raises(ConfigError, match="sample shape"):
        IIDNoise((8, 8))
    with pytest.raises(ConfigError, match="at most 4096 dimensions.*12288.*noise=lowrank or noise=spectral"):
        CovarianceNoise((3, 64, 64))
    with pytest.raises(ConfigError, match=r"built for images of shape \(1, 8, 8\), the data gives \(1, 16, 16\)"):
        CovarianceNoise((1, 8, 8)).fit([torch.zeros(4, 1, 16, 16)])
    with pytest.raises(ConfigError, match="zero variance"):
        SpectralNoise((1, 8, 8)).fit([torch.zeros(4, 1, 8, 8)])


def test_dense_fit_needs_five_samples_per_dimension():
    # digits at the default 16x16: n = 256 needs 1,280 samples
    message = r"noise=covariance .* 256 x 256 .* >= 5 n = 1280 .* got 1000: use noise=lowrank or noise=spectral"
    noise = CovarianceNoise((1, 16, 16))
    with pytest.raises(ConfigError, match=message):
        noise.check_num_samples(1000)  # callable up front, before any training
    with pytest.raises(ConfigError, match=message):
        noise.fit(digits_tensor(16)[0][:1000].split(100))
    with pytest.raises(ConfigError, match="noise.rank=16 needs more than 16 training samples, got 10"):
        LowRankNoise((1, 8, 8)).fit([DIGITS[:10]])


def test_clipping_is_refused_with_shaped_noise():
    IIDNoise((1, 8, 8)).check_clipping("sampler.clip_sample", True)
    for name in ("offset", "covariance", "lowrank", "spectral"):
        noise = NOISES[name]((1, 8, 8))
        noise.check_clipping("sampler.clip_sample", False)
        with pytest.raises(ConfigError, match=f"sampler.clip_sample cannot be used with noise={name}.*noise=iid"):
            noise.check_clipping("sampler.clip_sample", True)
    with pytest.raises(ConfigError, match="noise=iid with noise.center=true"):
        IIDNoise((1, 8, 8), center=True).check_clipping("sampler.dynamic_threshold", True)


@pytest.mark.parametrize("name", list(NOISES))
def test_every_config_option_builds_with_the_callers_shape(name):
    cfg = compose("noise_report", [f"noise={name}"])
    noise = instantiate(cfg.noise, shape=(3, 8, 8))
    assert isinstance(noise, NOISES[name]) and noise.shape == (3, 8, 8) and noise.option == f"noise={name}"


def test_noise_report_writes_its_figure(tmp_path, capsys):
    from difflab.tasks.noise_report import noise_report

    cfg = compose("noise_report", ["dataset.resolution=8", "num_draws=4000", f"output_dir={tmp_path}"])
    result = noise_report(cfg)
    png = tmp_path / "noise_report.png"
    assert result["png"] == png and png.stat().st_size > 30_000
    assert Image.open(png).size == (1500, 950)
    numbers = json.loads((tmp_path / "noise_report.json").read_text())
    spectra = numbers["spectra"]
    assert spectra["data"]["pr"] == pytest.approx(13.2, abs=0.2)  # the 1,617 training digits
    assert spectra["iid noise"]["pr"] > 60 and spectra["shaped noise"]["pr"] < 16
    assert spectra["whitened data"]["pr"] > 50  # the 13 floored near-constant pixels keep it below 64
    assert numbers["empirical_rel_error"] < 3 * numbers["expected_rel_error"]
    assert load_noise(tmp_path / "noise.safetensors").fitted
    out = capsys.readouterr().out
    assert "whitened data" in out and "eff. rank" in out and str(png) in out
