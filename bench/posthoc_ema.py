"""Post-hoc EMA on the digits: the FD of EMAs of several widths reconstructed from ONE run's snapshots, against the
classic EMA at two fixed decays (the model's ema_decay: 0.995 in that run, 0.999 in a second run of the same seed).

    python -m bench.posthoc_ema [--steps 1200] [--every 100] [--num-samples 1000] [--sampler-steps 50] [OVERRIDE ...]

Both runs train the default model (model=small, 16x16) with the default config, only ``trainer.max_steps``, the
snapshot interval and ``model.ema_warmup=false`` set: with the default warm-up, d = min(decay, (1 + n) / (10 + n))
stays below 0.995 for the first ~1,800 steps, so at this budget 0.995 and 0.999 would be the same EMA. They train
the same weights (the EMA never feeds back), so only the averaging differs.
Runs go to outputs/bench/posthoc_ema/ and are reused when their last.ckpt is there. FD: bench.common's 8x8 pixel
space Frechet distance of DDIM samples (seed 0) to all 1,797 digits. Also prints the per-step cost of the two
power-function EMA updates on the model's parameters.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import ROOT, compose, frechet_distance, real_digits, sampler_config
from difflab.build import build_module, load_checkpoint
from difflab.ema import PowerFunctionEMA, sigma_rel_to_gamma
from difflab.tasks import train
from difflab.tasks.posthoc_ema import posthoc_ema

OUT = ROOT / "outputs" / "bench" / "posthoc_ema"
SIGMA_RELS = (0.03, 0.05, 0.08, 0.10, 0.15, 0.2)


def trained(name: str, steps: int, overrides: list[str]) -> Path:
    run_dir = OUT / f"{name}_{steps}"
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file() or torch.load(last, weights_only=True)["global_step"] != steps:
        start = time.perf_counter()
        train(compose("train", [f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false", "logger=none",
                                f"output_dir={run_dir}", *overrides]))
        print(f"trained {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return run_dir


def update_ms(repeats: int = 200) -> float:
    """ms per step of the two power-function EMA updates (0.05, 0.10) over the default model's UNet parameters."""
    params = list(build_module(compose("train", [f"output_dir={OUT}"])).net.parameters())
    ema = PowerFunctionEMA(params, [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)])
    start = time.perf_counter()
    for t in range(1, repeats + 1):
        ema.update(params, t)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=100, help="snapshot interval in optimizer steps")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--sampler-steps", type=int, default=50)
    parser.add_argument("overrides", nargs="*", help="train.py overrides for both runs (a reduced budget: model=tiny)")
    args = parser.parse_args()
    print(f"power-function EMA updates (2 widths): {update_ms():.2f} ms / step", flush=True)
    tag = "".join(f"_{o}" for o in args.overrides).replace("=", "-").replace("/", "-")
    fixed_decay = ["model.ema_warmup=false", *args.overrides]
    one = trained(f"posthoc{tag}", args.steps, [f"callbacks.posthoc_ema.every_n_steps={args.every}", *fixed_decay])
    fixed = trained(f"decay_0.999{tag}", args.steps,
                    ["model.ema_decay=0.999", "callbacks.posthoc_ema=null", *fixed_decay])
    real = real_digits(16)
    sampler = sampler_config("ddim", f"num_steps={args.sampler_steps}")

    def fd(ckpt: Path) -> float:
        return frechet_distance(load_checkpoint(ckpt).generate(sampler, args.num_samples, seed=0, batch_size=250), real)

    rows = [("EMA decay 0.995, no warm-up (run 1)", fd(one / "checkpoints" / "last.ckpt")),
            ("EMA decay 0.999, no warm-up (run 2)", fd(fixed / "checkpoints" / "last.ckpt"))]
    for sigma_rel in SIGMA_RELS:
        ckpt = posthoc_ema(compose("posthoc_ema", [f"run={one}", f"sigma_rel={sigma_rel}"]))
        rows.append((f"post-hoc sigma_rel {sigma_rel} (run 1)", fd(ckpt)))
    print(f"\n{' '.join(args.overrides) or 'model=small'}, {args.steps} steps, snapshots every {args.every}; "
          f"FD of {args.num_samples} DDIM-{args.sampler_steps} "
          "samples to all digits (8x8 pixels)\n\n| EMA | FD |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()
