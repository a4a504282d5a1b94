"""Sample quality of a trained checkpoint: Frechet distance to the real digits in 8x8 pixel space.

    python -m bench.sample_quality outputs/train/latest [--num-samples 1000] [--sampler NAME] [--steps 50]

NAME is any conf/sampler option (ancestral, ddpm, ddim, dpmpp_2m, unipc, ...).

Prints the distance of the samples to all 1,797 digits, and, at the held-out split's size (180),
three comparable numbers against the training split: the samples, the held-out split itself (the
floor a perfect model reaches at that sample size) and Gaussian noise matched to the data's
per-pixel mean and std (a model that learned nothing).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import frechet_distance, sampler_config
from difflab.build import load_checkpoint
from difflab.data import DigitsDataModule
from difflab.images import save_grid, to_uint8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--sampler", default="ddim", help="a conf/sampler option")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--grid", default=None, help="also write the first 100 samples as a PNG grid here")
    args = parser.parse_args()

    module = load_checkpoint(args.ckpt)
    resolution = module.net.sample_shape[-1]
    dm = DigitsDataModule(resolution=resolution, val_fraction=0.1)
    dm.setup()
    real = torch.cat([dm.train_set.images, dm.val_set.images])
    sampler = sampler_config(args.sampler, f"num_steps={args.steps}")
    start = time.perf_counter()
    fake = module.generate(sampler, args.num_samples, seed=0, batch_size=250)
    seconds = time.perf_counter() - start
    if args.grid:
        save_grid(to_uint8(fake[:100]), args.grid, nrow=10, scale=4)
    noise = real.mean(0) + real.std(0) * torch.randn((args.num_samples, *real.shape[1:]), generator=torch.Generator().manual_seed(0))
    print(f"checkpoint: {args.ckpt} ({args.sampler}-{args.steps}, {args.num_samples} samples, {seconds / args.num_samples:.4f} s/image)")
    n, train = len(dm.val_set.images), dm.train_set.images
    print(f"FD(samples, all digits)          = {frechet_distance(fake, real):.3f}  (n={args.num_samples})")
    print(f"FD(samples, train split)         = {frechet_distance(fake[:n], train):.3f}  (n={n})")
    print(f"FD(held-out split, train split)  = {frechet_distance(dm.val_set.images, train):.3f}  (n={n}: the floor)")
    print(f"FD(matched noise, train split)   = {frechet_distance(noise[:n].clamp(-1, 1), train):.3f}  (n={n}: learned nothing)")


if __name__ == "__main__":
    main()
