"""Shaped noise at the same training budget (issue #7): iid vs offset vs covariance vs spectral.

    python -m bench.noise_options [--steps 1200] [--options iid,offset,covariance,spectral] [--num-samples 1000]

Trains each option with `python train.py noise=NAME run_id=bench_noise_NAME_STEPS` (the default model and data, the
same seed and number of optimizer steps; the median logged train/images_per_sec shows the per-step cost is the same
up to the colour/whiten maps), then the Frechet distance of 1000 samples to all 1,797 digits in 8x8 pixel space for
DDIM at 10, 25 and 50 steps and DDPM with all 1000 steps (500 samples there: it is 20x the cost). A finished run
dir is reused, so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import ROOT, frechet_distance, real_digits, sampler_config
from difflab.build import load_checkpoint

SAMPLERS = (("ddim", 10), ("ddim", 25), ("ddim", 50), ("ddpm", 1000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--options", default="iid,offset,covariance,spectral")
    parser.add_argument("--num-samples", type=int, default=1000)
    args = parser.parse_args()

    real = real_digits(16)  # the default resolution; FD compares them area-averaged to 8x8 (bench/common.py)
    print("| noise | img/s (median) | " + " | ".join(f"FD {n}-{s}" for n, s in SAMPLERS) + " |")
    print("|---" * (2 + len(SAMPLERS)) + "|")
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    floors = [frechet_distance(real[order[: args.num_samples if steps < 1000 else args.num_samples // 2]], real)
              for _, steps in SAMPLERS]
    print("| real digits, same counts (floor) | | " + " | ".join(f"{fd:.3f}" for fd in floors) + " |", flush=True)
    for option in args.options.split(","):
        run_dir = ROOT / "outputs" / "train" / f"bench_noise_{option}_{args.steps}"
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file() or torch.load(last, weights_only=True)["global_step"] < args.steps:
            subprocess.run(
                [sys.executable, str(ROOT / "train.py"), f"noise={option}", f"run_id={run_dir.name}",
                 f"trainer.max_steps={args.steps}", "trainer.enable_progress_bar=false"],
                cwd=ROOT, check=True,
            )
        with open(Path(run_dir) / "logs" / "metrics.csv") as f:
            speeds = [float(r["train/images_per_sec"]) for r in csv.DictReader(f) if r.get("train/images_per_sec")]
        module = load_checkpoint(run_dir)
        fds = []
        for name, steps in SAMPLERS:
            n = args.num_samples if steps < 1000 else args.num_samples // 2
            fake = module.generate(sampler_config(name, f"num_steps={steps}"), n, seed=0, batch_size=250)
            fds.append(frechet_distance(fake, real))
        print(f"| {option} | {statistics.median(speeds):.0f} | " + " | ".join(f"{fd:.3f}" for fd in fds) + " |", flush=True)


if __name__ == "__main__":
    main()
