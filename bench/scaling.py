"""Training throughput of the launch and speed knobs, each a real `python train.py` run of the default model.

    python -m bench.scaling [--steps 80] [--rounds 2] [--variants fp32,ddp2,bf16,channels_last,compile]

Variants: fp32 (1 process, 2 threads: the default), ddp2 (trainer=ddp_cpu: 2 gloo processes of 1
thread each, the stand-in for multi-GPU), bf16 (trainer.precision=bf16-mixed), channels_last
(model.channels_last=true), compile (model.compile=true). Throughput is the median over steps
20.. of the module's logged ``train/images_per_sec`` (global images per second), read from
metrics.csv; rounds alternate the variants, since step times drift 10-15% on these shared machines.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "fp32": [],
    "ddp2": ["trainer=ddp_cpu"],
    "bf16": ["trainer.precision=bf16-mixed"],
    "channels_last": ["model.channels_last=true"],
    "compile": ["model.compile=true"],
}
SKIP = 20


def run(variant: str, steps: int, out: Path) -> tuple[float, float]:
    """(median images/s over steps SKIP.., wall seconds) of one train.py run."""
    run_dir = out / f"{variant}_{time.time_ns()}"
    cmd = [
        sys.executable, str(ROOT / "train.py"), *VARIANTS[variant], f"trainer.max_steps={steps}",
        "trainer.val_check_interval=100000", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "callbacks=none", f"hydra.run.dir={run_dir}",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    wall = time.perf_counter() - start
    with open(run_dir / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/images_per_sec")]
    rates = [float(r["train/images_per_sec"]) for r in rows if int(r["step"]) >= SKIP]
    return statistics.median(rates), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = args.variants.split(",")
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for v in variants if r % 2 == 0 else variants[::-1]:
                results[v].append(run(v, args.steps, Path(tmp)))
                print(f"round {r} {v}: {results[v][-1][0]:.1f} img/s, {results[v][-1][1]:.0f} s wall", flush=True)
    base = statistics.median(x for x, _ in results[variants[0]])
    print(f"\n| variant | img/s (median of rounds) | vs {variants[0]} | wall s ({args.steps} steps, incl. start-up) |")
    print("|---|---|---|---|")
    for v in variants:
        rate = statistics.median(x for x, _ in results[v])
        wall = statistics.median(w for _, w in results[v])
        print(f"| {v} | {rate:.1f} | {rate / base:.2f}x | {wall:.0f} |")


if __name__ == "__main__":
    main()
