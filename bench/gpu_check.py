"""GPU check of the paper-scale path: a few hundred steps of experiment=cifar10_ddpm (the 35.7M UNet of Ho et al. 2020,
batch 128, bf16-mixed) on synthetic 32x32 data, through train.py's own code; prints img/s, peak memory and MFU.

    python -m bench.gpu_check                       # on a CUDA machine: 300 steps, under 8 minutes with the startup
    python -m bench.gpu_check --peak-tflops 989     # the GPU's dense bf16 peak, when its name is not in PEAK_TFLOPS
    python -m bench.gpu_check --flops-only          # anywhere: the model FLOPs per training image, no training
    python -m bench.gpu_check --accelerator cpu --model tiny --steps 12 --batch 8 --precision 32-true   # a CPU smoke run

MFU (model FLOP utilisation, PaLM's definition) = the UNet's forward + backward FLOPs per image (counted once by
torch's FlopCounterMode on the meta device, so nothing is allocated) x images per second / the device's peak.
Throughput is measured after the first ``--warmup`` steps (cuDNN autotuning, allocator growth).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import compose  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "4090": 165.0}
"""Dense bf16 tensor-core peak (TFLOP/s) by a substring of ``torch.cuda.get_device_name()`` (vendors' data sheets)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (the first --warmup are not timed)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--model", default="ddpm_cifar10")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--images", type=int, default=1024, help="synthetic images written to a temporary folder")
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: looked up in PEAK_TFLOPS")
    parser.add_argument("--flops-only", action="store_true", help="print the FLOPs per training image and stop")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps={args.steps} must exceed --warmup={args.warmup}")
    return args


def config(args: argparse.Namespace, data_dir: Path, out_dir: Path):
    """The train.py config of the check: experiment=cifar10_ddpm with the check's model, batch, steps and precision;
    no validation, grids or periodic checkpoints within the timed steps (last.ckpt at the end, as train.py writes)."""
    return compose("train", [
        "experiment=cifar10_ddpm", f"model={args.model}", f"dataset.path={data_dir}",
        f"dataset.resolution={args.resolution}", f"dataset.batch_size={args.batch}", "dataset.val_fraction=0.05",
        f"trainer={'gpu' if args.accelerator == 'gpu' else 'cpu'}", f"trainer.precision={args.precision}",
        f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", f"callbacks.model_checkpoint.every_n_train_steps={args.steps}",
        "callbacks.sample_grid=null", "logger=none", f"output_dir={out_dir}",
        "+callbacks.timer._target_=bench.gpu_check.StepTimer", f"+callbacks.timer.warmup={args.warmup}",
    ])


def train_flops_per_image(cfg) -> float:
    """Forward + backward FLOPs of the UNet of ``cfg`` for one image (meta device: counted, never computed)."""
    channels, size = int(cfg.dataset.channels), int(cfg.dataset.resolution)
    with torch.device("meta"):
        unet = instantiate(cfg.model.net.unet, sample_size=size, in_channels=channels, out_channels=channels)
        x, t = torch.randn(1, channels, size, size), torch.randint(0, 1000, (1,))
        with FlopCounterMode(display=False) as counter:
            unet(x, t).sample.sum().backward()
    return float(counter.get_total_flops())


class StepTimer(L.Callback):
    """Wall time of the optimizer steps after the first ``warmup`` (CUDA synchronised at both ends)."""

    latest: StepTimer | None = None
    """The timer the trainer built last (the trainer builds it from the config)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None
        StepTimer.latest = self

    def _now(self, module: L.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = self._now(module)
            if module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(module.device)
        elif trainer.global_step == trainer.max_steps:
            self.end = self._now(module)


def write_images(folder: Path, count: int, resolution: int) -> None:
    """``count`` random RGB PNGs of ``resolution`` x ``resolution`` (synthetic data: only the speed is measured)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def run(args: argparse.Namespace) -> dict[str, float]:
    """Train and measure; returns img/s, peak memory (GiB, CUDA only), FLOPs per image and MFU (None without a peak)."""
    from bench import gpu_check  # the module the trainer's config names (this file may run as __main__)
    from difflab.tasks import train

    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --accelerator cpu for a smoke run")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, out_dir = Path(tmp) / "data", Path(tmp) / "run"
        data_dir.mkdir()
        write_images(data_dir, args.images, args.resolution)
        cfg = config(args, data_dir, out_dir)
        flops = train_flops_per_image(cfg)
        train(cfg)
    timer = gpu_check.StepTimer.latest
    images_per_sec = args.batch * (args.steps - args.warmup) / (timer.end - timer.start)
    result = {"images_per_sec": images_per_sec, "train_gflops_per_image": flops / 1e9}
    if args.accelerator == "gpu":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        result["device"] = name
        result["mfu"] = flops * images_per_sec / (peak * 1e12) if peak else None
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.flops_only:
        cfg = compose("train", [f"model={args.model}", "dataset=image_folder", "dataset.path=unused",
                                f"dataset.resolution={args.resolution}", "dataset.channels=3"])
        print(f"model={args.model} {args.resolution}x{args.resolution}: "
              f"{train_flops_per_image(cfg) / 1e9:.2f} GFLOP per training image (forward + backward)")
        return
    result = run(args)
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
