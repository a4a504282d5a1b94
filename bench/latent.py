"""Pixel-space vs latent-space diffusion on the digits at the same CPU training time (issue #4).

    python -m bench.latent [--pixel-steps 1200] [--rounds 3] [--num-samples 1000]

1. Stage 1: `python train_vae.py run_id=bench_vae` (the default autoencoder=small, 600 steps), reused if present.
2. Throughput: rounds of 60-step `train.py` runs alternating pixel (the default model on 16x16x1 images) and latent
   (`latent=vae`, the same model on the VAE's 4x4x4 latents, encoded on the fly); the median of the logged
   train/images_per_sec over steps 20-60 of each (the shared machine drifts, so the two alternate).
3. Equal time: the pixel model trains --pixel-steps steps (the default run), the latent model the number of steps
   that takes the same time at the measured throughputs. Both runs are reused if present.
4. For each: seconds per image of the default sampler (ancestral DDPM, 50 steps; latent: with the decoder) and the
   Frechet distance of --num-samples samples to all 1,797 digits in 8x8 pixel space.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import ROOT, frechet_distance, real_digits, sampler_config
from difflab.build import load_checkpoint

VAE = ROOT / "outputs" / "vae" / "bench_vae"


def train(args: list[str]) -> None:
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "trainer.enable_progress_bar=false"], cwd=ROOT,
                   check=True, capture_output=True)


def throughput(extra: list[str]) -> float:
    """Median logged images/s over steps 20..60 of a fresh 60-step run (no grids or checkpoints in between)."""
    with tempfile.TemporaryDirectory() as tmp:
        train([*extra, "trainer.max_steps=60", "trainer.val_check_interval=60", "trainer.log_every_n_steps=1",
               "callbacks.sample_grid.every_n_steps=1000", "callbacks.model_checkpoint.every_n_train_steps=1000",
               f"hydra.run.dir={tmp}"])
        with open(Path(tmp) / "logs" / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/images_per_sec") and int(r["step"]) >= 20]
        return statistics.median(float(r["train/images_per_sec"]) for r in rows)


def done(run_dir: Path, steps: int) -> bool:
    last = run_dir / "checkpoints" / "last.ckpt"
    return last.is_file() and torch.load(last, weights_only=True)["global_step"] >= steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixel-steps", type=int, default=1200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--pixel-run", type=Path, default=None,
                        help="an existing default-config run of --pixel-steps steps to use as the pixel model")
    args = parser.parse_args()

    if not (VAE / "vae" / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "train_vae.py"), f"run_id={VAE.name}",
                        "trainer.enable_progress_bar=false"], cwd=ROOT, check=True)
    latent = ["latent=vae", f"latent.path={VAE / 'vae'}"]
    rates: dict[str, list[float]] = {"pixel": [], "latent": []}
    for _ in range(args.rounds):
        rates["pixel"].append(throughput([]))
        rates["latent"].append(throughput(latent))
    pixel_rate, latent_rate = statistics.median(rates["pixel"]), statistics.median(rates["latent"])
    latent_steps = round(args.pixel_steps * latent_rate / pixel_rate)
    runs = {
        "pixel": (args.pixel_run or ROOT / "outputs" / "train" / f"bench_pixel_{args.pixel_steps}", [], args.pixel_steps),
        "latent": (ROOT / "outputs" / "train" / f"bench_latent_{latent_steps}", latent, latent_steps),
    }
    for run_dir, extra, steps in runs.values():
        if not done(run_dir, steps):
            train([*extra, f"trainer.max_steps={steps}", f"run_id={run_dir.name}"])

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; throughput rounds {rates}")
    print("| space | train img/s (median) | steps at equal time | s/image (ancestral-50) | FD to the digits |")
    print("|---|---|---|---|---|")
    real = None
    for name, (run_dir, _, steps) in runs.items():
        module = load_checkpoint(run_dir)
        real = real if real is not None else real_digits(module.image_shape[-1])
        start = time.perf_counter()
        fake = module.generate(sampler_config("ancestral"), args.num_samples, seed=0, batch_size=250)
        per_image = (time.perf_counter() - start) / args.num_samples
        rate = pixel_rate if name == "pixel" else latent_rate
        print(f"| {name} | {rate:.0f} | {steps} | {per_image:.4f} | {frechet_distance(fake, real):.3f} |", flush=True)


if __name__ == "__main__":
    main()
