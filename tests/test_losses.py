"""The likelihood pieces of the variational bound: normal_kl, the discretised decoder, L_T."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from difflab.losses import discretized_gaussian_log_likelihood, normal_kl, prior_bpd


def test_normal_kl_is_zero_for_equal_gaussians_and_matches_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=gen, dtype=torch.float64), torch.randn(100, generator=gen, dtype=torch.float64)
    lv1, lv2 = torch.randn(100, generator=gen, dtype=torch.float64), torch.randn(100, generator=gen, dtype=torch.float64)
    assert torch.allclose(normal_kl(m1, lv1, m1, lv1), torch.zeros(100, dtype=torch.float64), atol=1e-15)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-12)


@pytest.mark.parametrize(("mean", "log_scale"), [(0.0, math.log(0.1)), (0.7, math.log(0.01)), (-1.3, 0.5), (0.0, -8.0)])
def test_discretized_gaussian_sums_to_one_over_the_256_bins(mean, log_scale):
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    assert bool((log_p <= 0).all())


def test_discretized_gaussian_equals_the_bin_mass():
    """A bin's probability is Phi((x + 1/255 - m)/s) - Phi((x - 1/255 - m)/s), the edge bins open-ended."""
    x = torch.tensor([-1.0, -1 + 2 / 255 * 40, 1.0], dtype=torch.float64)
    m, s = torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    normal = Normal(m, s)
    expected = torch.stack([
        normal.cdf(x[0] + 1 / 255), normal.cdf(x[1] + 1 / 255) - normal.cdf(x[1] - 1 / 255), 1 - normal.cdf(x[2] - 1 / 255),
    ])
    got = discretized_gaussian_log_likelihood(x, m.expand(3), s.log().expand(3)).exp()
    assert torch.allclose(got, expected, rtol=1e-9)


def test_prior_term_is_the_kl_to_the_standard_normal():
    x0 = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    abar = torch.tensor(0.01, dtype=torch.float64)
    q = Normal(abar.sqrt() * x0, (1 - abar).sqrt())
    expected = kl_divergence(q, Normal(0.0, 1.0)).mean() / math.log(2)
    assert prior_bpd(x0, abar).item() == pytest.approx(expected.item(), rel=1e-12)
