"""Memory and time of a training step with and without model.gradient_checkpointing=true, on CPU at 64x64.

    python -m bench.gradient_checkpointing [--model ddpm_cifar10] [--resolution 64] [--batch 4]

Each variant runs in its own process, with glibc told to serve every allocation over 64 KiB by mmap
(MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the resident set at once and RSS follows the live tensors.
In each, the module is built, the kernel's peak-RSS counter reset (/proc/self/clear_refs, 5) and the forward
and backward pass of a training step's loss run and timed; the step's memory is the peak RSS during it minus
the RSS before it: the activations kept for the backward pass and the gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import compose  # noqa: E402


def rss_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak since the last reset) of this process, KiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def one_variant(model: str, resolution: int, batch: int, checkpointing: bool) -> dict[str, float]:
    """Peak extra memory (MiB) and time (s) of the forward and backward pass of DiffusionModule.losses."""
    from difflab.build import build_module

    cfg = compose("train", [f"model={model}", "dataset=image_folder", "dataset.path=unused", "dataset.channels=3",
                            f"dataset.resolution={resolution}", f"model.gradient_checkpointing={checkpointing}",
                            "output_dir=unused"])
    torch.manual_seed(0)
    module = build_module(cfg)
    x0 = torch.randn(batch, 3, resolution, resolution)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    losses, _, _ = module.losses(x0, module.net, generator=torch.Generator().manual_seed(0))
    losses.mean().backward()
    seconds = time.perf_counter() - start
    return {"step_mib": (rss_kib("VmHWM") - before) / 1024, "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ddpm_cifar10")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--variant", choices=["on", "off"], help=argparse.SUPPRESS)  # a child process's one variant
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args.model, args.resolution, args.batch, args.variant == "on")))
        return
    results = {}
    for variant in ("off", "on"):
        cmd = [sys.executable, __file__, f"--model={args.model}", f"--resolution={args.resolution}",
               f"--batch={args.batch}", f"--variant={variant}"]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results[variant] = json.loads(proc.stdout.splitlines()[-1])
    off, on = results["off"], results["on"]
    print(f"model={args.model} {args.resolution}x{args.resolution} batch={args.batch} threads={torch.get_num_threads()}")
    for name, r in results.items():
        print(f"gradient_checkpointing={name}: forward+backward memory {r['step_mib']:.0f} MiB, time {r['step_s']:.2f} s")
    print(f"memory ratio on/off {on['step_mib'] / off['step_mib']:.2f}, time ratio on/off {on['step_s'] / off['step_s']:.2f}")


if __name__ == "__main__":
    main()
