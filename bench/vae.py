"""Stage 1 of latent diffusion on the digits: held-out reconstruction error of the default VAE against baselines.

    python -m bench.vae [--out DIR] [--grid docs/images/vae_reconstructions.png] [OVERRIDE ...]

Trains ``python train_vae.py``'s default (``autoencoder=small``, 16x16 digits, its default number of
steps; extra arguments are Hydra overrides such as ``trainer.max_steps=2000``) in this process,
timing the fit (validation, checkpoints and grids included); the training throughput is measured
apart, as batch / median step time over ``--throughput-steps`` steps of the same module under a
bare ``lightning.Trainer`` (as bench/train_throughput.py does). Then it loads the saved VAE from
``<out>/vae`` and reconstructs the held-out split from the posterior mean. Baselines that keep
about as many numbers per image as the latent (c*h*w): the training split's mean image (no
information), bilinear down- and up-sampling through the latent's spatial size and through a
grid of c*h*w pixels, and PCA fitted on the training split. Reports MSE, L1 and PSNR (images in
[-1, 1], so the peak-to-peak range is 2) as a markdown table, and copies the last reconstruction
grid to ``--grid``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchmetrics.image import PeakSignalNoiseRatio

from bench.common import compose
from bench.train_throughput import WARMUP, StepTimer, median_step
from difflab.build import build_autoencoder
from difflab.data import DigitsDataModule
from difflab.tasks import train_vae
from difflab.vae import encode_latents, estimate_scaling_factor, latent_shape, load_vae


def resample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) down to size x size and back up to x's size; x (N, C, H, W)."""
    small = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def pca(train: torch.Tensor, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Projection onto the top-k principal components of ``train`` (N, C, H, W), fitted in float64."""
    flat = train.flatten(1).double()
    mean = flat.mean(0)
    basis = torch.linalg.svd(flat - mean, full_matrices=False).Vh[:k]
    return lambda x: (((x.flatten(1).double() - mean) @ basis.T) @ basis + mean).float().view_as(x)


def images_per_second(cfg, steps: int) -> float:
    """Training throughput of the VAEModule of ``cfg``: batch / median step time (no validation, no callbacks)."""
    torch.manual_seed(0)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=WARMUP + steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        gradient_clip_val=cfg.trainer.gradient_clip_val, callbacks=[timer],
    )
    trainer.fit(build_autoencoder(cfg), datamodule=instantiate(cfg.dataset))
    return cfg.dataset.batch_size / median_step(timer.starts)


def errors(x_hat: torch.Tensor, x: torch.Tensor) -> str:
    psnr = PeakSignalNoiseRatio(data_range=2.0)(x_hat, x).item()
    shown = f"{psnr:.1f}" if psnr < 100 else "lossless (float error)"
    return f"{F.mse_loss(x_hat, x).item():.4f} | {F.l1_loss(x_hat, x).item():.4f} | {shown}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="run dir (default: a temporary dir, removed at the end)")
    parser.add_argument("--grid", default=None, help="copy the final reconstruction grid here")
    parser.add_argument("--throughput-steps", type=int, default=40)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_vae_"))

    cfg = compose("vae", [f"output_dir={out}", "trainer.enable_progress_bar=false", *args.overrides])
    start = time.perf_counter()
    metrics = train_vae(cfg)
    seconds = time.perf_counter() - start
    steps, batch = cfg.trainer.max_steps, cfg.dataset.batch_size
    throughput = images_per_second(cfg, args.throughput_steps)
    print(f"\ntrained {steps} steps of {batch} images in {seconds:.0f} s ({steps * batch / seconds:.0f} img/s with "
          f"validation every {cfg.trainer.val_check_interval} steps, checkpoints and grids); training alone "
          f"{throughput:.0f} img/s (median of {args.throughput_steps} steps); "
          f"val/rec_mse_ema {metrics.get('val/rec_mse_ema', float('nan')):.4f}")

    data = DigitsDataModule(resolution=cfg.dataset.resolution)
    data.setup("fit")
    train, held_out = data.train_set.images, data.val_set.images
    vae = load_vae(out / "vae")
    c, h, w = latent_shape(vae, held_out.shape[1:])
    values = c * h * w
    with torch.no_grad():
        x_hat = vae.decode(vae.encode(held_out).latent_dist.mean).sample
    side = math.isqrt(values)
    rows = [
        (f"VAE, posterior mean (latent {c}x{h}x{w} = {values} values)", x_hat),
        ("mean training image", train.mean(0, keepdim=True).expand_as(held_out)),
        (f"bilinear down/up through {h}x{w} (the latent's spatial size, {h * w} values)", resample(held_out, h)),
        (f"bilinear down/up through {side}x{side} ({side * side} values)", resample(held_out, side)),
        (f"PCA, {values // 2} components", pca(train, values // 2)(held_out)),
        (f"PCA, {values} components", pca(train, values)(held_out)),
    ]
    from_mean = estimate_scaling_factor(vae, train[:512].split(128), posterior="mean")
    factor = vae.config.scaling_factor
    with torch.no_grad():
        scaled_std = (encode_latents(vae, held_out, "sample", torch.Generator().manual_seed(1)) * factor).std()
    print(f"\nscaling_factor {factor:.4f} (posterior samples; from the posterior mean: {from_mean:.4f}); "
          f"std of the scaled held-out latents {scaled_std:.3f}")
    print(f"held-out split: {len(held_out)} digits at {held_out.shape[-1]}x{held_out.shape[-1]}\n")
    print("| reconstruction | MSE | L1 | PSNR (dB) |\n|---|---|---|---|")
    for name, rec in rows:
        print(f"| {name} | {errors(rec, held_out)} |")
    grids = sorted((out / "reconstructions").glob("step_*.png"))
    if args.grid and grids:
        shutil.copyfile(grids[-1], args.grid)
        print(f"\ngrid: {args.grid} ({Path(args.grid).stat().st_size / 1024:.0f} KB, from {grids[-1].name})")
    if args.out is None:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
