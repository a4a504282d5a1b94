"""Classifier-free guidance, label dropout and classifier guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from difflab.guidance import ClassifierFreeGuidance, ClassifierGuidance, balanced_labels, drop_labels
from difflab.images import class_rows
from difflab.samplers import DDIM, DDPM
from difflab.schedule import NoiseSchedule
from tests.conftest import compose


@pytest.fixture(scope="module")
def conditional_module():
    from difflab.tasks import build_module

    cfg = compose("train", ["model=tiny", "dataset.resolution=8", "conditioning=class", "conditioning.num_classes=10", "output_dir=/unused"])
    module = build_module(cfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero class embedding, so conditional and unconditional passes differ
        module.ema.module.unet.class_embedding.weight.normal_()
    return module


def test_cfg_weights_one_and_zero_are_exactly_the_single_passes(conditional_module):
    net = conditional_module.ema.module
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 1000, (6,), generator=gen), torch.arange(6)
    null = torch.full_like(y, 10)
    with torch.no_grad():
        eps_c, eps_u = net(x, t, y), net(x, t, null)
        assert not torch.allclose(eps_c, eps_u)
        assert torch.equal(ClassifierFreeGuidance(net, 1.0, 10)(x, t, y), eps_c)
        assert torch.equal(ClassifierFreeGuidance(net, 0.0, 10)(x, t, y), eps_u)
        guided = ClassifierFreeGuidance(net, 3.0, 10)(x, t, y)
    assert torch.allclose(guided, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-5)  # one batched forward = two


def test_cfg_rescale_matches_the_conditional_std(conditional_module):
    net = conditional_module.ema.module
    x, t, y = torch.randn(4, 1, 8, 8), torch.full((4,), 500), torch.arange(4)
    with torch.no_grad():
        full = ClassifierFreeGuidance(net, 5.0, 10, rescale=1.0)(x, t, y)
        eps_c = net(x, t, y)
    assert torch.allclose(full.std(dim=(1, 2, 3)), eps_c.std(dim=(1, 2, 3)), rtol=1e-5)


def test_label_dropout_rate_and_null_index():
    y = torch.randint(0, 10, (200_000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(1))
    is_null = dropped == 10
    se = (0.1 * 0.9 / len(y)) ** 0.5
    assert abs(is_null.float().mean().item() - 0.1) < 4.5 * se
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert torch.equal(drop_labels(y, 0.0, 10), y)


class LinearClassifier(nn.Module):
    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.w = nn.Linear(d, k)

    def forward(self, x, t):
        return self.w(x.flatten(1))


def test_classifier_guidance_shift_is_the_scaled_gradient():
    torch.manual_seed(0)
    clf, sched = LinearClassifier(4, 3), NoiseSchedule.linear()
    eps_net = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    x, t, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 10, 200, 500, 999]), torch.tensor([0, 1, 2, 0, 1])
    eps = ClassifierGuidance(eps_net, clf, 2.0, sched.alphas_cumprod)(x, t, y)
    # analytic: grad_x log softmax(W x + b)_y = W_y - sum_k p_k W_k
    with torch.no_grad():
        p = torch.softmax(clf(x, t), -1)
        grad = (clf.w.weight[y] - p @ clf.w.weight).view(5, 1, 2, 2)
    sigma = (1 - sched.alphas_cumprod[t]).sqrt().float().view(5, 1, 1, 1)
    assert torch.allclose(eps, -2.0 * sigma * grad, atol=1e-6)


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_classifier_guidance_moves_the_ddpm_mean_by_s_sigma_grad(variance):
    """Dhariwal & Nichol, Algorithm 1: mu -> mu + s Sigma grad log p(y | x_t), on a respaced grid."""
    from difflab.samplers import ddpm_step

    torch.manual_seed(1)
    clf, sched = LinearClassifier(4, 3), NoiseSchedule.cosine()
    sampler = DDPM(num_steps=10, variance=variance)
    pairs = sampler.pairs(1000)
    eps_net = lambda x, t, y: 0.3 * x  # noqa: E731
    guided = ClassifierGuidance(eps_net, clf, 2.0, sched.alphas_cumprod, pairs, variance)
    abar = sched.alphas_cumprod
    for t_val, t_prev in pairs[:-1]:
        x, y = torch.randn(5, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
        t = torch.full((5,), t_val)
        with torch.no_grad():
            p = torch.softmax(clf.double()(x, t), -1)
            grad = (clf.w.weight[y] - p @ clf.w.weight).view(5, 1, 2, 2)
        mean = ddpm_step(x, eps_net(x, t, y), abar[t_val], abar[t_prev], None)
        shifted = ddpm_step(x, guided(x, t, y), abar[t_val], abar[t_prev], None)
        beta = 1 - abar[t_val] / abar[t_prev]
        sigma2 = beta if variance == "beta" else (1 - abar[t_prev]) / (1 - abar[t_val]) * beta
        assert torch.allclose(shifted - mean, 2.0 * sigma2 * grad, rtol=1e-9, atol=1e-12), t_val


def test_classifier_guidance_with_scale_zero_is_unguided_bit_for_bit(conditional_module):
    clf = LinearClassifier(64, 10)
    labels = balanced_labels(10, 10)
    for sampler in (DDPM(num_steps=5), DDIM(num_steps=5)):
        plain = conditional_module.generate(sampler, 10, seed=1, labels=labels)
        zero = conditional_module.generate(sampler, 10, seed=1, labels=labels, classifier=clf, classifier_scale=0.0)
        guided = conditional_module.generate(sampler, 10, seed=1, labels=labels, classifier=clf, classifier_scale=5.0)
        assert torch.equal(plain, zero)
        assert not torch.allclose(plain, guided)


def test_guidance_needs_label_dropout():
    from difflab.tasks import build_module

    cfg = compose("train", ["model=tiny", "dataset.resolution=8", "conditioning=class", "conditioning.num_classes=3",
                            "conditioning.p_uncond=0", "output_dir=/unused"])
    with pytest.raises(ValueError, match=r"guidance_scale=3.0 needs a model trained with label dropout"):
        build_module(cfg).guided_denoiser(guidance_scale=3.0)


def test_balanced_labels_and_class_rows():
    assert balanced_labels(3, 7).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    images = np.arange(5)[:, None, None, None].astype(np.uint8) + 1
    rows, nrow = class_rows(images, np.array([2, 0, 2, 2, 0]))
    assert nrow == 3
    assert rows[:, 0, 0, 0].tolist() == [2, 5, 0, 1, 3, 4]  # class 0 (images 2, 5) padded, then class 2
