"""Paper-scale model presets (parameter counts against the papers), experiment configs, gradient checkpointing,
and the CPU-runnable parts of bench/gpu_check.py."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from difflab.build import build_module
from tests.conftest import compose

PRESETS = [
    # preset, the UNet's data-dependent keys in the paper's setting, the paper's parameter count, tolerance
    ("ddpm_cifar10", {"sample_size": 32}, 35.7e6, 0.002),  # Ho et al. 2020, Appendix B
    ("ddpm_256", {"sample_size": 256}, 114e6, 0.005),  # Ho et al. 2020, Appendix B (CelebA-HQ / LSUN)
    # Dhariwal & Nichol 2021, Table 10 (ImageNet 64: 1000 classes, learned variance: 6 output channels)
    ("adm64", {"sample_size": 64, "out_channels": 6, "num_class_embeds": 1000}, 296e6, 0.002),
    # Kim et al. 2023 (BK-SDM), Table 1: BK-SDM-Small's UNet, on SD v1's 4x64x64 latents
    ("sd_small", {"sample_size": 64, "in_channels": 4, "out_channels": 4}, 482.3e6, 0.0005),
]


@pytest.mark.parametrize(("preset", "data_keys", "paper", "tolerance"), PRESETS, ids=[p[0] for p in PRESETS])
def test_each_preset_has_the_papers_parameter_count(preset, data_keys, paper, tolerance):
    cfg = compose("train", [f"model={preset}"])
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        unet = instantiate(cfg.model.net.unet, **data_keys)
    count = sum(p.numel() for p in unet.parameters())
    assert abs(count - paper) <= tolerance * paper, f"{preset}: {count:,} parameters, the paper says {paper:,.0f}"


def test_the_adm_preset_uses_scale_shift_norm_and_several_heads():
    cfg = compose("train", ["model=adm64"])
    with torch.device("meta"):
        unet = instantiate(cfg.model.net.unet, sample_size=64)
    assert unet.config.resnet_time_scale_shift == "scale_shift"
    heads = [a.heads for block in unet.down_blocks for a in getattr(block, "attentions", [])]
    assert heads == [6] * 3 + [9] * 3 + [12] * 3  # 64 channels per head at 384, 576 and 768 channels, 3 blocks each


EXPERIMENTS = {
    # experiment: (model, resolution, batch, lr, max_steps, schedule, learn_variance)
    "cifar10_ddpm": ("ddpm_cifar10", 32, 128, 2e-4, 800_000, "linear", False),
    "celebahq256_ddpm": ("ddpm_256", 256, 64, 2e-5, 500_000, "linear", False),
    "imagenet64_adm": ("adm64", 64, 2048, 3e-4, 540_000, "cosine", True),
}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_configs_compose_to_the_papers_settings(experiment):
    model, resolution, batch, lr, steps, schedule, learn_variance = EXPERIMENTS[experiment]
    cfg = compose("train", [f"experiment={experiment}", "dataset.path=/data/images"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices.model == model
    assert cfg.dataset._target_ == "difflab.data.ImageFolderDataModule" and cfg.dataset.channels == 3
    assert (cfg.dataset.resolution, cfg.dataset.batch_size, cfg.optimizer.lr) == (resolution, batch, lr)
    assert (cfg.trainer.max_steps, cfg.trainer.accelerator, cfg.trainer.precision) == (steps, "gpu", "bf16-mixed")
    assert cfg.model.ema_decay == 0.9999 and not cfg.model.ema_warmup
    assert cfg.schedule._target_.endswith(schedule) and cfg.schedule.num_timesteps == 1000
    assert cfg.loss.learn_variance == learn_variance
    assert cfg.callbacks.posthoc_ema is None and cfg.callbacks.sample_grid.every_n_steps >= 10_000


def test_a_command_line_override_wins_over_the_experiment():
    cfg = compose("train", ["experiment=cifar10_ddpm", "trainer=cpu", "model=tiny", "trainer.max_steps=5"])
    assert (cfg.trainer.accelerator, cfg.trainer.max_steps, cfg.model.net.unet.block_out_channels) == ("cpu", 5, [16, 32])
    assert cfg.optimizer.lr == 2e-4  # the rest of the experiment stays


def test_gradient_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients():
    grads, calls = {}, {}
    for on in (False, True):
        cfg = compose("train", ["model=tiny", "dataset.resolution=8", f"model.gradient_checkpointing={on}",
                                "output_dir=unused"])
        torch.manual_seed(0)
        module = build_module(cfg)
        count = [0]
        module.net.unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        losses, _, _ = module.losses(torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), module.net,
                                     generator=torch.Generator().manual_seed(2))
        losses.mean().backward()
        grads[on] = torch.cat([p.grad.flatten() for p in module.net.parameters()])
        calls[on] = count[0]
    assert calls == {False: 1, True: 2}  # the block ran again in the backward pass
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)


def test_gpu_check_counts_flops_and_parses_its_arguments():
    from bench.gpu_check import parse_args, train_flops_per_image

    args = parse_args([])
    assert (args.model, args.resolution, args.batch, args.precision, args.steps) == ("ddpm_cifar10", 32, 128, "bf16-mixed", 300)
    with pytest.raises(SystemExit):
        parse_args(["--steps", "10", "--warmup", "10"])
    cfg = compose("train", ["experiment=cifar10_ddpm", "dataset.path=unused"])
    flops = train_flops_per_image(cfg)
    # forward ~6 GMAC (12 GFLOP) for Ho et al.'s CIFAR10 UNet; backward about twice the forward
    assert 3 * 11e9 < flops < 3 * 13.5e9
    small = train_flops_per_image(compose("train", ["experiment=cifar10_ddpm", "dataset.path=unused", "dataset.resolution=16"]))
    assert 0.2 < small / flops < 0.3  # convolutions scale with the pixels (attention a little faster)


@pytest.mark.gpu
def test_gpu_check_runs_on_cuda():
    from bench.gpu_check import parse_args, run

    result = run(parse_args(["--steps", "60", "--warmup", "20", "--images", "256"]))
    assert result["images_per_sec"] > 0 and 0 < result["peak_memory_gib"] < 80
    assert result["mfu"] is None or 0 < result["mfu"] < 1
