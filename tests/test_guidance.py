"""Classifier-free guidance, label dropout and classifier guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from difflab.guidance import ClassifierFreeGuidance, ClassifierGuidance, balanced_labels, drop_labels
from difflab.images import class_rows
from difflab.objectives import Prediction
from difflab.samplers import DDIM, DDPM, ddpm_step
from difflab.schedule import NoiseSchedule
from tests.conftest import compose


@pytest.fixture(scope="module")
def conditional_module():
    from difflab.build import build_module

    cfg = compose("train", ["model=tiny", "dataset.resolution=8", "conditioning=class", "conditioning.num_classes=10", "output_dir=/unused"])
    module = build_module(cfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero class embedding, so conditional and unconditional passes differ
        module.ema.module.unet.class_embedding.weight.normal_()
    return module


def test_cfg_weights_one_and_zero_are_exactly_the_single_passes(conditional_module):
    denoiser = conditional_module.denoiser(conditional_module.ema.module)
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 1000, (6,), generator=gen), torch.arange(6)
    abar = conditional_module.schedule.alphas_cumprod[t]
    null = torch.full_like(y, 10)
    with torch.no_grad():
        eps_c, eps_u = denoiser(x, t, abar, y).eps, denoiser(x, t, abar, null).eps
        assert not torch.allclose(eps_c, eps_u)
        assert torch.equal(ClassifierFreeGuidance(denoiser, 1.0, 10)(x, t, abar, y).eps, eps_c)
        assert torch.equal(ClassifierFreeGuidance(denoiser, 0.0, 10)(x, t, abar, y).eps, eps_u)
        guided = ClassifierFreeGuidance(denoiser, 3.0, 10)(x, t, abar, y)
    assert torch.allclose(guided.eps, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-5)  # one batched forward = two


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_cfg_in_any_objective_guides_eps_alike(objective):
    """eps, x0, v are affine in each other at fixed x_t: guiding the v- or x0-output guides eps by the same rule."""
    gen = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 1, 2, 2, generator=gen, dtype=torch.float64), torch.full((4,), 300), torch.arange(4)
    abar = NoiseSchedule.cosine().alphas_cumprod[t]
    eps_c, eps_u = torch.randn(4, 1, 2, 2, generator=gen, dtype=torch.float64), torch.randn(4, 1, 2, 2, generator=gen, dtype=torch.float64)

    def denoiser(x_t, t, abar_t, labels):  # eps_c for labels < 10, eps_u for the null label, expressed in `objective`
        eps = torch.where((labels < 10).view(-1, 1, 1, 1), torch.cat([eps_c] * (len(labels) // 4)), torch.cat([eps_u] * (len(labels) // 4)))
        pred = Prediction(eps, "eps", x_t, abar_t.view(-1, 1, 1, 1))
        return pred.with_output(pred.as_objective(objective), objective)

    guided = ClassifierFreeGuidance(denoiser, 2.5, 10)(x, t, abar, y)
    assert guided.objective == objective
    assert torch.allclose(guided.eps, eps_u + 2.5 * (eps_c - eps_u), atol=1e-12)


def test_cfg_rescale_matches_the_conditional_std(conditional_module):
    denoiser = conditional_module.denoiser(conditional_module.ema.module)
    x, t, y = torch.randn(4, 1, 8, 8), torch.full((4,), 500), torch.arange(4)
    abar = conditional_module.schedule.alphas_cumprod[t]
    with torch.no_grad():
        full = ClassifierFreeGuidance(denoiser, 5.0, 10, rescale=1.0)(x, t, abar, y).output
        cond = denoiser(x, t, abar, y).output  # rescaled in the objective's own output, as diffusers does
    assert torch.allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-5)


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


def _eps_model(scale: float):
    """A denoiser predicting eps = scale x_t."""
    return lambda x, t, abar, y: Prediction(scale * x, "eps", x, abar.view(-1, 1, 1, 1))  # noqa: E731


def test_classifier_guidance_shift_is_the_scaled_gradient():
    torch.manual_seed(0)
    clf, sched = LinearClassifier(4, 3), NoiseSchedule.linear()
    x, t, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 10, 200, 500, 999]), torch.tensor([0, 1, 2, 0, 1])
    eps = ClassifierGuidance(_eps_model(0.0), clf, 2.0)(x, t, sched.alphas_cumprod[t], y).eps
    # analytic: grad_x log softmax(W x + b)_y = W_y - sum_k p_k W_k
    with torch.no_grad():
        p = torch.softmax(clf(x, t), -1)
        grad = (clf.w.weight[y] - p @ clf.w.weight).view(5, 1, 2, 2)
    sigma = (1 - sched.alphas_cumprod[t]).sqrt().float().view(5, 1, 1, 1)
    assert torch.allclose(eps, -2.0 * sigma * grad, atol=1e-6)


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_classifier_guidance_moves_the_ddpm_mean_by_s_sigma_grad(variance):
    """Dhariwal & Nichol, Algorithm 1: mu -> mu + s Sigma grad log p(y | x_t), on a respaced grid."""
    torch.manual_seed(1)
    clf, sched = LinearClassifier(4, 3), NoiseSchedule.cosine()
    sampler = DDPM(num_steps=10, variance=variance)
    pairs = sampler.pairs(1000)
    eps_net = _eps_model(0.3)
    abar = sched.alphas_cumprod
    guided = ClassifierGuidance(eps_net, clf, 2.0, sampler.mean_shift_as_x0(abar))
    for t_val, t_prev in pairs[:-1]:
        x, y = torch.randn(5, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
        t = torch.full((5,), t_val)
        with torch.no_grad():
            p = torch.softmax(clf.double()(x, t), -1)
            grad = (clf.w.weight[y] - p @ clf.w.weight).view(5, 1, 2, 2)
        mean = ddpm_step(x, eps_net(x, t, abar[t], y).x0, abar[t_val], abar[t_prev], None, None)
        shifted = ddpm_step(x, guided(x, t, abar[t], y).x0, abar[t_val], abar[t_prev], None, None)
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
    from difflab.build import build_module

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
