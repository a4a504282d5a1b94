"""Prediction target x loss weighting at the same training budget (issue #8): eps / v / x0, uniform / min-SNR.

    python -m bench.objectives [--steps 1200] [--variants eps:simple,v:simple,x0:simple,eps:min_snr,v:min_snr,x0:min_snr]
        [--num-samples 1000]

Trains each variant with `python train.py objective=O loss=L run_id=bench_O_L` (the default model, digits at 16x16,
the same seed, --steps optimizer steps: the objectives and weightings cost the same per step, so equal steps are
equal CPU time), then reports the Frechet distance of 1000 samples to all 1,797 digits in 8x8 pixel space for the
default sampler (ancestral DDPM, 50 steps) and DPM-Solver++(2M) at 20 steps, and the final validation losses.
A finished run dir is reused (the same command resumes or skips it), so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import ROOT, frechet_distance, real_digits, sampler_config
from difflab.build import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--variants", default="eps:simple,v:simple,x0:simple,eps:min_snr,v:min_snr,x0:min_snr")
    parser.add_argument("--num-samples", type=int, default=1000)
    args = parser.parse_args()

    rows = []
    for variant in args.variants.split(","):
        objective, loss = variant.split(":")
        run_dir = ROOT / "outputs" / "train" / f"bench_{objective}_{loss}_{args.steps}"
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file() or torch.load(last, weights_only=True)["global_step"] < args.steps:
            subprocess.run(
                [sys.executable, str(ROOT / "train.py"), f"objective={objective}", f"loss={loss}",
                 f"run_id={run_dir.name}", f"trainer.max_steps={args.steps}", "trainer.enable_progress_bar=false"],
                cwd=ROOT, check=True,
            )
        rows.append((objective, loss, run_dir))

    real = None
    print("| objective | weighting | val/loss_ema (own units) | FD ancestral-50 | FD dpmpp_2m-20 |\n|---|---|---|---|---|")
    for objective, loss, run_dir in rows:
        module = load_checkpoint(run_dir)
        real = real if real is not None else real_digits(module.net.sample_shape[-1])
        fds = []
        for name, steps in (("ancestral", 50), ("dpmpp_2m", 20)):
            fake = module.generate(sampler_config(name, f"num_steps={steps}"), args.num_samples, seed=0, batch_size=250)
            fds.append(frechet_distance(fake, real))
        with open(Path(run_dir) / "logs" / "metrics.csv") as f:
            val = float([row["val/loss_ema"] for row in csv.DictReader(f) if row.get("val/loss_ema")][-1])
        print(f"| {objective} | {loss} | {val:.4f} | {fds[0]:.3f} | {fds[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
