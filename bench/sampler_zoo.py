"""Frechet distance vs number of model evaluations (NFE) for the samplers of issue #8, with seconds per image.

    python bench/sampler_zoo.py outputs/train/latest [--samplers ancestral,ddim,dpmpp_2m,unipc,euler_ancestral,heun]
        [--nfe 5,10,20,50,100,1000] [--num-samples 250]

Each sampler runs at the step count that gives each NFE (Heun evaluates the model 2 n - 1 times in n steps, so it
gets n = (NFE + 1) // 2 and reports its real NFE); the same seed, so every row starts from the same noise. FD is the
Frechet distance to all 1,797 digits in their native 8x8 pixel space (bench/common.py), every row at the same sample
count (FD is biased upward at small counts, so rows of other counts would not compare); the first row is its floor,
the same number of real training digits. Seconds per image is the sampling wall time over the images (batch 250),
on a machine whose load is printed with the table. The samples are kept in outputs/bench/sampler_zoo/ (npz).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from bench.common import ROOT, frechet_distance, real_digits, sampler_config
from difflab.images import to_uint8
from difflab.tasks import load_checkpoint


def steps_for(name: str, nfe: int) -> int:
    """The num_steps that gives ``nfe`` model evaluations (or the nearest below, for Heun)."""
    return (nfe + 1) // 2 if name in ("heun", "kdpm2", "kdpm2_ancestral") else nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--samplers", default="ancestral,ddim,dpmpp_2m,unipc,euler_ancestral,heun")
    parser.add_argument("--nfe", default="5,10,20,50,100,1000")
    parser.add_argument("--num-samples", type=int, default=250)
    args = parser.parse_args()

    module = load_checkpoint(args.ckpt)
    real = real_digits(module.image_shape[-1])
    out = ROOT / "outputs" / "bench" / "sampler_zoo"
    out.mkdir(parents=True, exist_ok=True)
    n = args.num_samples
    floor = frechet_distance(real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:n]], real)
    print(f"checkpoint {args.ckpt}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {n} samples per row")
    print(f"| sampler | NFE | steps | FD (8x8 pixels) | s/image |\n|---|---|---|---|---|\n| {n} real digits (floor) | | | {floor:.3f} | |")
    for name in args.samplers.split(","):
        for nfe in (int(v) for v in args.nfe.split(",")):
            steps = steps_for(name, nfe)
            sampler = sampler_config(name, f"num_steps={steps}")
            start = time.perf_counter()
            fake = module.generate(sampler, n, seed=0, batch_size=250)
            seconds = (time.perf_counter() - start) / n
            real_nfe = 2 * steps - 1 if name in ("heun", "kdpm2", "kdpm2_ancestral") else steps
            np.savez(out / f"{name}_{real_nfe}.npz", arr_0=to_uint8(fake))
            print(f"| {name} | {real_nfe} | {steps} | {frechet_distance(fake, real):.3f} | {seconds:.4f} |", flush=True)


if __name__ == "__main__":
    main()
