"""Sampling speed: difflab's DDPM-1000 and DDIM-50 vs the same loop written over diffusers' schedulers.

    python bench/sampling.py [--batch 32] [--rounds 3] [--model small] [--resolution 16]

Same UNet (random weights: speed does not depend on them), same batch. Rounds alternate between
the two implementations; seconds per image is the median round's wall time / batch (a 3-second
DDIM round is easily hit by background load on these shared machines, so DDIM gets 5x the rounds).
"""

from __future__ import annotations

import argparse
import time
from statistics import median

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from bench.common import compose
from difflab.samplers import DDIM, DDPM
from difflab.tasks import build_module


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
    parser.add_argument("--rounds", type=int, default=3, help="rounds of DDPM-1000; DDIM-50 gets 5x as many")
    parser.add_argument("--model", default="small")
    parser.add_argument("--resolution", type=int, default=16)
    args = parser.parse_args()
    module = build_module(compose("train", [f"model={args.model}", f"dataset.resolution={args.resolution}", "output_dir=/unused"]))
    module.eval()
    unet = module.ema.module.unet
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
            start = time.perf_counter()
            module.generate(ours, args.batch, seed=r, batch_size=args.batch)
            t_ours.append((time.perf_counter() - start) / args.batch)
            start = time.perf_counter()
            diffusers_loop(unet, theirs, steps, shape, seed=r)
            t_theirs.append((time.perf_counter() - start) / args.batch)
        print(
            f"{name}: difflab {median(t_ours):.4f} s/image, diffusers loop {median(t_theirs):.4f} s/image, "
            f"speed ratio {median(t_theirs) / median(t_ours):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
