"""bench.noise_diagnosis's math: the exact denoiser's x0 error per band is the Gaussian posterior variance, and the
band and SNR helpers on diagonal examples (no model, no training)."""

from __future__ import annotations

import math

import pytest
import torch

from bench.noise_diagnosis import (
    DataGaussian,
    band_label,
    band_means,
    direction_snr,
    directional_variance,
    exact_prediction,
    fit_gaussian,
    loss_shares,
    parse_bands,
    projected_mse,
)
from difflab.noise import CovarianceNoise, IIDNoise, ShapedNoise
from difflab.noise.gaussian import posterior_x0_covariance
from difflab.schedule import q_sample_abar

SHAPE = (1, 4, 4)
N = 16
LAM = torch.logspace(0.6, -1.5, N, dtype=torch.float64)  # 3.98 .. 0.032, distinct: a unique eigenbasis
BANDS = parse_bands("1-2,3-6,7-16", N)


def known_gaussian(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m (C, H, W), Sigma = Q diag(LAM) Q^T (n, n), Q (n, n)) with a random orthonormal Q."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=torch.float64))[0]
    return torch.randn(SHAPE, generator=gen, dtype=torch.float64), q * LAM @ q.T, q


def with_moments(m: torch.Tensor, q: torch.Tensor, count: int = 5 * N) -> torch.Tensor:
    """Images (count, C, H, W) whose sample mean is m and sample covariance exactly Q diag(LAM) Q^T."""
    w = torch.randn(count, N, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    w = w - w.mean(0)
    e, v = torch.linalg.eigh(torch.cov(w.T))
    w = w @ (v * e.rsqrt() @ v.T)  # sample covariance I
    return m + (w * LAM.sqrt() @ q.T).view(count, *SHAPE)


def covariance_noise(q: torch.Tensor, m: torch.Tensor) -> ShapedNoise:
    """noise=covariance fitted to images of covariance Q diag(LAM) Q^T (every eigenvalue above the floor: C = Sigma)."""
    return CovarianceNoise(SHAPE).fit([with_moments(m, q)])


@pytest.mark.parametrize("name", ["iid", "covariance"])
@pytest.mark.parametrize("abar", [0.9, 0.2])
def test_exact_denoisers_x0_error_is_the_posterior_variance(name, abar):
    # In the shared eigenbasis the posterior of x0 is diagonal, Var(x0_i | x_t) = lam_i c_i (1 - abar) /
    # (abar lam_i + (1 - abar) c_i) (c_i = 1 for iid, lam_i for C = Sigma), and the error along u_i is Gaussian,
    # so its mean square over N draws has variance 2 v_i^2 / N, independently per direction: a band's mean over
    # |b| directions has standard deviation sqrt(2 sum v_i^2 / N) / |b|.
    m, sigma, q = known_gaussian()
    noise = IIDNoise(SHAPE) if name == "iid" else covariance_noise(q, m)  # iid: mu = 0 != m, the shift is exercised
    torch.testing.assert_close(noise.covariance(), sigma if name == "covariance" else torch.eye(N, dtype=torch.float64))
    draws, gen = 40_000, torch.Generator().manual_seed(1)
    x0 = m + (torch.randn(draws, N, generator=gen, dtype=torch.float64) * LAM.sqrt() @ q.T).view(draws, *SHAPE)
    z = torch.randn(draws, *SHAPE, generator=gen, dtype=torch.float64)
    abar_t = torch.full((draws, 1, 1, 1), abar, dtype=torch.float64)
    y_t = q_sample_abar(noise.from_data(x0), abar_t, z)
    data = DataGaussian(m, sigma, LAM, q)  # the known Gaussian, not the draws' estimate

    x0_hat = noise.to_data(exact_prediction(noise, data, y_t, abar_t).x0)
    measured = band_means(projected_mse((x0_hat - x0).flatten(1), q), BANDS)
    c = torch.ones(N, dtype=torch.float64) if name == "iid" else LAM
    posterior = LAM * c * (1 - abar) / (abar * LAM + (1 - abar) * c)
    expected = band_means(posterior, BANDS)
    sd = torch.stack([(2 * posterior[lo:hi].square().sum() / draws).sqrt() / (hi - lo) for lo, hi in BANDS])
    assert ((measured - expected).abs() <= 4 * sd).all(), (measured, expected, sd)
    analytic = directional_variance(posterior_x0_covariance(sigma, noise.covariance(), torch.tensor(abar, dtype=torch.float64)), q)
    torch.testing.assert_close(analytic, posterior, rtol=1e-9, atol=1e-12)


def test_fit_gaussian_sorts_the_spectrum():
    m, sigma, q = known_gaussian()
    x = m + (torch.randn(20_000, N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
             * LAM.sqrt() @ q.T).view(-1, *SHAPE)
    data = fit_gaussian(x)
    assert data.mean.shape == SHAPE
    assert (data.lam.diff() <= 0).all()
    torch.testing.assert_close(data.u * data.lam @ data.u.T, data.sigma)
    # a sample covariance of N draws: each eigenvalue within a few sqrt(2 / N) of its own
    assert ((data.lam / LAM - 1).abs() < 4 * math.sqrt(2 / 20_000)).all()


def test_bands():
    assert parse_bands("1-4,5-16,17-64,65-256", 256) == [(0, 4), (4, 16), (16, 64), (64, 256)]
    assert parse_bands("1-4,5-16,17-64,65-256", 64) == [(0, 4), (4, 16), (16, 64)]  # 8x8: no null band
    assert parse_bands("1-4,5-100", 64) == [(0, 4), (4, 64)]
    assert [band_label(b) for b in parse_bands("1-1,2-3", 8)] == ["1-1", "2-3"]
    for bad in ("1-4,x", "4-1", "0-3", "5"):
        with pytest.raises(ValueError, match="FIRST-LAST"):
            parse_bands(bad, 16)
    values = torch.arange(1.0, 7.0)
    torch.testing.assert_close(band_means(values, [(0, 2), (2, 6)]), torch.tensor([1.5, 4.5]))
    torch.testing.assert_close(loss_shares(values, [(0, 2), (2, 6)]), torch.tensor([3 / 21, 18 / 21]))


def test_snr_and_bases_on_a_diagonal_example():
    lam = torch.tensor([4.0, 1.0, 0.25, 0.0], dtype=torch.float64)
    data = fit_gaussian(torch.randn(50_000, 1, 2, 2, generator=torch.Generator().manual_seed(3),
                                    dtype=torch.float64) * lam.sqrt().view(1, 1, 2, 2))
    u = data.u.abs().round()  # the coordinate axes, in order of decreasing variance
    torch.testing.assert_close(u, torch.eye(4, dtype=torch.float64))
    c = directional_variance(torch.diag(torch.tensor([2.0, 1.0, 1.0, 0.5], dtype=torch.float64)), u)
    torch.testing.assert_close(c, torch.tensor([2.0, 1.0, 1.0, 0.5], dtype=torch.float64))
    # abar = 0.8: SNR_i = 4 lam_i / c_i
    torch.testing.assert_close(direction_snr(lam, c, 0.8), torch.tensor([8.0, 4.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(band_means(direction_snr(lam, c, 0.8), [(0, 2), (2, 4)]),
                               torch.tensor([6.0, 0.5], dtype=torch.float64))
