"""EMA arithmetic, the module's loss and sampling determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difflab.ema import EMA
from difflab.samplers import DDIM, DDPM
from tests.conftest import compose


def test_ema_follows_the_warmup_recursion():
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.9, warmup=True)
    expected = None
    for n, w in enumerate([1.0, 3.0, -2.0, 5.0, 0.5, 4.0]):
        model.weight.data.fill_(w)
        ema.update(model)
        if expected is None:
            expected = w  # the first update copies
        else:
            d = min(0.9, (1 + n) / (10 + n))  # n updates so far
            expected = d * expected + (1 - d) * w
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert ema.current_decay(0) == pytest.approx(0.1) and ema.current_decay(10_000) == 0.9
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_without_warmup_uses_the_constant_decay():
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.5, warmup=False)
    for w in [2.0, 4.0, 8.0]:
        model.weight.data.fill_(w)
        ema.update(model)
    assert ema.module.weight.item() == pytest.approx(0.5 * (0.5 * 2 + 0.5 * 4) + 0.5 * 8)
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\), got decay=1.0"):
        EMA(model, decay=1.0)


@pytest.fixture(scope="module")
def tiny_module():
    from difflab.build import build_module

    return build_module(compose("train", ["model=tiny", "dataset.resolution=8", "output_dir=/unused"]))


def test_samples_do_not_depend_on_the_batch_size(tiny_module):
    for sampler in (DDIM(num_steps=4), DDPM(num_steps=4)):
        whole = tiny_module.generate(sampler, 5, seed=3, batch_size=5)
        split = tiny_module.generate(sampler, 5, seed=3, batch_size=2)
        assert whole.shape == (5, 1, 8, 8)
        # only float rounding of the batched convolutions may differ (untrained weights: values ~400)
        assert (whole - split).abs().max() <= 1e-6 * whole.abs().max()
        assert not torch.allclose(whole, tiny_module.generate(sampler, 5, seed=4, batch_size=5))


class ZeroNet(nn.Module):
    """A "network" that predicts 0, with the UNetDenoiser attributes the loss reads."""

    learn_variance = self_condition = False

    def forward(self, x, t, y=None):
        return torch.zeros_like(x)


def test_loss_is_l_simple_of_the_noise():
    from difflab.build import build_module

    eps_module = build_module(compose("train", ["model=tiny", "dataset.resolution=8", "objective=eps",
                                                "output_dir=/unused"]))
    x0 = torch.zeros(4, 1, 8, 8)
    # predicting eps = 0 costs E||eps||^2 = 1 per element
    losses = [eps_module.losses(x0, ZeroNet(), generator=torch.Generator().manual_seed(i))[0].mean().item() for i in range(50)]
    assert sum(losses) / len(losses) == pytest.approx(1.0, abs=0.03)
