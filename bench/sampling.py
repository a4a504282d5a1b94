"""Sampling speed: difflab's DDPM-1000 and DDIM-50 vs the same loop written over diffusers' schedulers.

    python -m bench.sampling [--batch 32] [--rounds 2] [--model small] [--resolution 16]

Same UNet (random weights: speed does not depend on them), same batch. Rounds alternate between
the two implementations (DDIM-50 gets 5x the rounds). Each UNet call is time-stamped, so a step's
time is the gap between consecutive calls (network, sampler arithmetic and noise draws together),
and seconds per image is the median step time x steps / batch: a median over thousands of steps
is not moved by the bursts of background load that shift whole-run times by 10% on these
shared machines.
"""

from __future__ import annotations

import argparse
from statistics import median

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from bench.common import Stamped, compose
from difflab.build import build_module
from difflab.samplers import DDIM, DDPM
from difflab.seeding import PerSampleNoise


@torch.no_grad()
def diffusers_loop(unet, scheduler, num_steps: int, shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(num_steps)
    x = torch.randn(shape, generator=gen)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, generator=gen).prev_sample
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of DDPM-1000; DDIM-50 gets 5x as many")
    parser.add_argument("--model", default="small")
    parser.add_argument("--resolution", type=int, default=16)
    args = parser.parse_args()
    module = build_module(compose("train", [f"model={args.model}", f"dataset.resolution={args.resolution}", "output_dir=/unused"]))
    module.eval()
    net = module.ema.module
    shape = (args.batch, *module.net.sample_shape)
    common = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "clip_sample": False}
    cases = {
        "DDPM-1000": (DDPM(), DDPMScheduler(**common), 1000, args.rounds),
        "DDIM-50": (DDIM(num_steps=50), DDIMScheduler(**common, timestep_spacing="trailing"), 50, 5 * args.rounds),
    }
    print(f"model={args.model} resolution={args.resolution} batch={args.batch} threads={torch.get_num_threads()}")
    for name, (ours, theirs, steps, rounds) in cases.items():
        t_ours, t_theirs = [], []
        for r in range(rounds):
            stamped = Stamped(net)
            ours(stamped, module.schedule.alphas_cumprod, PerSampleNoise.for_indices(r, range(args.batch)), shape[1:])
            t_ours += stamped.steps()
            stamped = Stamped(net.unet)
            diffusers_loop(stamped, theirs, steps, shape, seed=r)
            t_theirs += stamped.steps()
        ours_s, theirs_s = median(t_ours) * steps / args.batch, median(t_theirs) * steps / args.batch
        print(
            f"{name}: difflab {ours_s:.4f} s/image, diffusers loop {theirs_s:.4f} s/image, "
            f"speed ratio {theirs_s / ours_s:.3f} (median of {len(t_ours)} steps each)",
            flush=True,
        )


if __name__ == "__main__":
    main()
