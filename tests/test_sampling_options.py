"""sample.py's speed options: bf16 autocast around the network only, and batch_size=auto."""

from __future__ import annotations

import torch

from difflab.build import build_module
from difflab.samplers import DDIM
from difflab.tasks import sample
from tests.conftest import compose


def test_bf16_runs_only_the_network_in_bf16():
    module = build_module(compose("train", ["model=tiny", "dataset.resolution=8", "output_dir=unused"]))
    seen = []
    module.ema.module.unet.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.sample.dtype)))
    x_t, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((4,), 500)
    abar = module.schedule.alphas_cumprod[t]
    fp32 = module.denoiser(module.ema.module)(x_t, t, abar, None).output
    bf16 = module.denoiser(module.ema.module, "bf16")(x_t, t, abar, None).output
    assert seen == [(torch.float32, torch.float32), (torch.float32, torch.bfloat16)]
    assert bf16.dtype == torch.float32  # handed back to the sampler's float32 / float64 math
    error = (bf16 - fp32).norm() / fp32.norm()
    assert 0 < error < 0.02, error  # bf16 rounding (8 bits of mantissa), not another computation
    images = module.generate(DDIM(num_steps=3), num_samples=4, batch_size=4, precision="bf16")
    assert images.dtype == torch.float32 and seen[-1] == (torch.float32, torch.bfloat16)


def test_batch_size_auto_takes_all_samples_on_a_cpu_and_changes_no_image(trained_run, tmp_path, capsys):
    base = [f"ckpt={trained_run}", "num_samples=6", "sampler=ddim", "sampler.num_steps=2", "progress=false"]
    auto = sample(compose("sample", [*base, "batch_size=auto", f"output_dir={tmp_path / 'a'}"]))
    assert "batch size:  6 (batch_size=auto)" in capsys.readouterr().out
    fixed = sample(compose("sample", [*base, "batch_size=4", f"output_dir={tmp_path / 'b'}"]))
    assert (auto["images"] == fixed["images"]).all()  # sample i depends on (seed, i) only
