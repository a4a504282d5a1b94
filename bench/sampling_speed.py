"""Sampling speed at equal quality: seconds per image of diffusers' DDIMPipeline (50 steps), difflab's DDIM-50 in
float32 (also with x0 clipped to [-1, 1], as DDIMPipeline does by default), and faster difflab settings, with
the Frechet distance of each, side by side in one run.

    python -m bench.sampling_speed CKPT [--num-samples 500] [--batch 64] [--rounds 2]

All rows sample the checkpoint's EMA UNet (the same weights) at the same batch size. The distance is
bench.common's Frechet distance in 8x8 pixel space against all 1,797 digits (lower is better), and the one in
bench.quality_per_compute's independent classifier's feature space against its 898 reference digits; "equal
quality" means neither distance higher than DDIMPipeline's. Rows alternate within each round (these machines drift 10-15%),
and the best round's time is reported.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMPipeline, DDIMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import frechet_distance, real_digits, sampler_config  # noqa: E402
from bench.quality_per_compute import halves, independent_features  # noqa: E402
from difflab.build import load_checkpoint  # noqa: E402
from difflab.samplers.zoo import PREDICTION_TYPES  # noqa: E402

CLIP = "clip_x0=true"  # DDIMPipeline's DDIMScheduler clips x0_hat to [-1, 1] by default (clip_sample=True)
ROWS = [  # (label, sampler, sampler overrides, precision)
    ("difflab DDIM-50 fp32", "ddim", ["num_steps=50"], "fp32"),
    ("difflab DDIM-50 fp32, x0 clipped (DDIMPipeline's setting)", "ddim", ["num_steps=50", CLIP], "fp32"),
    ("difflab DDIM-50 bf16, x0 clipped", "ddim", ["num_steps=50", CLIP], "bf16"),
    ("difflab DPM-Solver++ 2M 20 steps bf16, x0 clipped", "dpmpp_2m", ["num_steps=20", CLIP], "bf16"),
    ("difflab UniPC 10 steps bf16", "unipc", ["num_steps=10"], "bf16"),
    ("difflab UniPC 10 steps bf16, x0 clipped", "unipc", ["num_steps=10", CLIP], "bf16"),
]


def diffusers_ddim(module, num_samples: int, batch: int) -> torch.Tensor:
    """DDIMPipeline over the EMA UNet with the model's betas and objective (eta 0, 50 steps, its defaults otherwise):
    (N, C, H, W)."""
    scheduler = DDIMScheduler(num_train_timesteps=module.schedule.num_timesteps,
                              trained_betas=module.schedule.betas.double().cpu().numpy(),
                              prediction_type=PREDICTION_TYPES[module.objective])
    pipe = DDIMPipeline(unet=module.ema.module.unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, num_samples, batch):
        n = min(batch, num_samples - start)
        images = pipe(batch_size=n, num_inference_steps=50, eta=0.0, output_type="np",
                      generator=torch.Generator().manual_seed(start)).images
        out.append(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    module = load_checkpoint(args.ckpt)
    real = real_digits(module.image_shape[1])
    features = independent_features(module.image_shape[1])
    (reference, _), _ = halves(module.image_shape[1])
    rows = {"diffusers DDIMPipeline 50 steps fp32": lambda: diffusers_ddim(module, args.num_samples, args.batch)}
    for label, name, overrides, precision in ROWS:
        sampler = sampler_config(name, *overrides)
        rows[label] = lambda s=sampler, p=precision: module.generate(s, args.num_samples, 0, args.batch, precision=p)
    seconds: dict[str, float] = {}
    distance: dict[str, float] = {}
    independent: dict[str, float] = {}
    for _ in range(args.rounds):
        for label, draw in rows.items():
            started = time.perf_counter()
            images = draw()
            elapsed = (time.perf_counter() - started) / args.num_samples
            seconds[label] = min(seconds.get(label, float("inf")), elapsed)
            images = images.float().clamp(-1, 1)
            distance[label] = frechet_distance(images, real)
            independent[label] = frechet_distance(images, reference, features)
    base = "diffusers DDIMPipeline 50 steps fp32"
    print(f"{args.ckpt}: {args.num_samples} samples, batch {args.batch}, threads {torch.get_num_threads()}")
    print("| setting | s/image | speed-up vs DDIMPipeline | FD 8x8 pixels | FD independent classifier |\n|---|---|---|---|---|")
    for label in rows:
        print(f"| {label} | {seconds[label]:.4f} | {seconds[base] / seconds[label]:.2f}x | {distance[label]:.3f} "
              f"| {independent[label]:.2f} |")
    equal = [label for label in rows if label != base and distance[label] <= distance[base]
             and independent[label] <= independent[base]]
    if equal:
        best = min(equal, key=seconds.get)
        print(f"fastest at both FDs <= DDIMPipeline's: {best}, {seconds[base] / seconds[best]:.2f}x")


if __name__ == "__main__":
    main()
