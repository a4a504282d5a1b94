"""Evaluation of the default digits model (issue #6): FID / KID / bits per dim along training, the NLL estimator's
accuracy and cost against the exact bound, and the sampler x steps table. Every number comes from evaluate.py's own
task (``difflab.tasks.evaluate``), the function ``python evaluate.py`` runs.

    python train.py run_id=bench_eval                                            # step_000300/600/900/1200 checkpoints
    python train_classifier.py --config-name feature_classifier                  # the FID / KID features
    python -m bench.evaluation checkpoints outputs/train/bench_eval --features outputs/feature_classifier/latest
    python -m bench.evaluation nll outputs/train/bench_eval --timesteps 10 25 50 100 --seeds 3
    python -m bench.evaluation samplers outputs/train/bench_eval --features outputs/feature_classifier/latest

Results go to ``outputs/bench/evaluation/<command>/`` (one results.json per evaluation, as evaluate.py writes them) and
the tables are printed. Timings on a shared machine: every line also prints the load average at that moment, and
seconds per image are also given as the median time of a UNet call (interleaved over the rows) x steps / batch.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch

from bench.common import ROOT, Stamped, compose
from difflab.build import load_checkpoint
from difflab.data import DigitsDataModule
from difflab.likelihood import bits_per_dim, strata
from difflab.summarize import summarize
from difflab.tasks import evaluate

OUT = ROOT / "outputs" / "bench" / "evaluation"


def load() -> str:
    """The 1-minute load average, for the record beside a timing."""
    return f"load {os.getloadavg()[0]:.2f}"


def run(name: str, overrides: list[str]) -> dict:
    """evaluate.py's task with these overrides, its results.json into OUT/name (replaced)."""
    return evaluate(compose("evaluate", [*overrides, f"output_dir={OUT / name}", "overwrite=true"]))


def training_times(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (wall seconds from the run's start to its checkpoint, seconds of optimizer steps from metrics.csv).

    Wall time: the checkpoint file's time minus the time of the run's .hydra/config.yaml (includes
    validation, sample grids and checkpoints). Step time: 25 logged steps x 64 images / train/images_per_sec,
    summed over the logged rows up to that step (the training loop alone).
    """
    start = (run_dir / ".hydra" / "config.yaml").stat().st_mtime
    with open(run_dir / "logs" / "metrics.csv") as f:
        rows = [(int(r["step"]), float(r["train/images_per_sec"])) for r in csv.DictReader(f) if r["train/images_per_sec"]]
    times = {}
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*.ckpt")):
        step = int(ckpt.stem.split("_")[1])
        # a row at step s covers the 25 steps before it: log_every_n_steps = 25, batch 64
        compute = sum(25 * 64 / rate for s, rate in rows if s <= step)
        times[step] = (ckpt.stat().st_mtime - start, compute)
    return times


def checkpoints(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    times = training_times(run_dir)
    print("| step | wall time (s) | step time (s) | FID | KID | bits/dim | sampling s/image | load |")
    print("|---|---|---|---|---|---|---|---|")
    for step, (wall, compute) in sorted(times.items()):
        ckpt = run_dir / "checkpoints" / f"step_{step:06d}.ckpt"
        r = run(f"checkpoints/step_{step:06d}", [
            f"ckpt={ckpt}", f"features.path={args.features}", f"num_samples={args.num_samples}",
            f"nll.timesteps={args.nll_timesteps}",
        ])
        m = r["metrics"]
        print(
            f"| {step} | {wall:.0f} | {compute:.0f} | {m['fid']:.4f} | {m['kid_mean']:.5f} +- {m['kid_std']:.5f} | "
            f"{m['nll_bpd']:.3f} +- {m['nll_bpd_stderr']:.3f} | {r['seconds_per_image']:.4f} | {load()} |",
            flush=True,
        )


def equal_strata(num_timesteps: int, k: int) -> list[tuple[int, int]]:
    """K strata of t = 1..T-1 of equal sizes (within one): the design the geometric strata replaced, for comparison."""
    edges = [1 + (i * (num_timesteps - 1)) // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def predicted_std(per_t: torch.Tensor, bounds: list[tuple[int, int]]) -> float:
    """Median over images of sqrt(sum_k n_k^2 Var_{t in S_k} L_{t-1}), from the exact terms per_t (N, T-1) of t = 1..T-1."""
    var = sum((hi - lo) ** 2 * per_t[:, lo - 1 : hi - 1].var(1, unbiased=False) for lo, hi in bounds)
    return float(var.sqrt().median())


def nll(args: argparse.Namespace) -> None:
    """The exact bound on the held-out split, and the stratified estimate's spread over seeds for each K."""
    ckpt = Path(args.run_dir) / "checkpoints" / "last.ckpt"
    module = load_checkpoint(ckpt)
    held_out = DigitsDataModule(resolution=module.net.sample_shape[-1]).split("val")[0]
    started = time.perf_counter()
    exact = bits_per_dim(module, held_out, batch_size=256)
    seconds = time.perf_counter() - started
    (OUT / "nll").mkdir(parents=True, exist_ok=True)
    torch.save({"strata": exact.strata, "decoder": exact.decoder, "prior": exact.prior}, OUT / "nll" / "exact_terms.pt")
    n = held_out.shape[0]
    s = exact.summary()
    print(f"exact: {s['nll_bpd']:.4f} +- {s['nll_bpd_stderr']:.4f} bits/dim (L_T {s['nll_prior_bpd']:.2e}, KL "
          f"{s['nll_kl_bpd']:.4f}, L_0 {s['nll_decoder_bpd']:.4f}); {n} images x 1000 = {n * 1000} UNet evaluations in "
          f"{seconds:.0f} s ({n * 1000 / seconds:.0f} /s; {load()})", flush=True)
    per_t = exact.strata.double()
    for lo, hi in [(1, 2), (2, 10), (10, 100), (100, 500), (500, 1000)]:
        print(f"  KL terms t in [{lo}, {hi}): {per_t.mean(0)[lo - 1 : hi - 1].sum():.4f} bits/dim")
    print("| K | evaluations per image | estimate (mean over seeds) | std over seeds | per-image std of (estimate - exact) |"
          " predicted per-image std, geometric / equal strata | seconds | load |")
    print("|---|---|---|---|---|---|---|---|")
    for k in args.timesteps:
        values, spreads, secs = [], [], []
        for seed in range(1, args.seeds + 1):
            started = time.perf_counter()
            est = bits_per_dim(module, held_out, num_strata=k, seed=seed, batch_size=256)
            secs.append(time.perf_counter() - started)
            values.append(float(est.total.double().mean()))
            spreads.append(float((est.total.double() - exact.total.double()).std()))
        mean = sum(values) / len(values)
        spread = (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5
        predicted = f"{predicted_std(per_t, strata(1000, k)):.3f} / {predicted_std(per_t, equal_strata(1000, k)):.3f}"
        print(f"| {k} | {k + 1} | {mean:.4f} | {spread:.4f} | {median(spreads):.3f} | {predicted} | {median(secs):.1f} "
              f"| {load()} |", flush=True)


@torch.no_grad()
def unet_step_time(ckpt: Path, batch: int, calls: int = 60) -> float:
    """Median seconds of one UNet call (with the sampler's arithmetic between calls) at this batch, from DDIM-``calls``."""
    from difflab.samplers import DDIM

    module = load_checkpoint(ckpt).eval()
    stamped = Stamped(module.ema.module.forward)
    module.ema.module.forward = stamped
    module.generate(DDIM(num_steps=calls), batch, seed=0, batch_size=batch)
    return median(b - a for a, b in zip(stamped.stamps, stamped.stamps[1:]))


def samplers(args: argparse.Namespace) -> None:
    """FID / KID and seconds per image of DDPM with all 1000 steps, the default ancestral 50 and DDIM 10 / 25 / 50 / 100.

    Run as a user would: ``python evaluate.py`` processes into one dir (a -m sweep for DDIM, single runs beside it),
    then ``python -m difflab.summarize`` on that dir.
    """
    ckpt = Path(args.run_dir) / "checkpoints" / "last.ckpt"
    sweep = OUT / "samplers"
    common = [f"ckpt={ckpt}", f"features.path={args.features}", f"num_samples={args.num_samples}",
              "metrics=[fid,kid]", f"batch_size={args.batch}", "overwrite=true"]
    jobs = [
        ["sampler=ddpm", f"hydra.run.dir={sweep / 'ddpm_1000'}"],
        ["sampler=ancestral", f"hydra.run.dir={sweep / 'ancestral_50'}"],
        ["-m", "sampler=ddim", "sampler.num_steps=10,25,50,100", f"hydra.sweep.dir={sweep / 'ddim'}"],
    ]
    for job in jobs:
        subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *common, *job], cwd=ROOT, check=True)
        print(f"({load()})", flush=True)
    step_times = [unet_step_time(ckpt, args.batch) for _ in range(3)]
    step = median(step_times)
    print(f"median UNet step at batch {args.batch}: {step * 1000:.1f} ms (rounds: "
          f"{', '.join(f'{s * 1000:.1f}' for s in step_times)}; {load()}): s/image = steps x {step / args.batch:.5f}")
    out = summarize(sweep)
    print(out["markdown"].read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("checkpoints", help="FID / KID / bits per dim at each periodic checkpoint of a run")
    p.add_argument("run_dir")
    p.add_argument("--features", required=True)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--nll-timesteps", type=int, default=50)
    p = sub.add_parser("nll", help="the exact bound and the stratified estimator's accuracy for several K")
    p.add_argument("run_dir")
    p.add_argument("--timesteps", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--seeds", type=int, default=3)
    p = sub.add_parser("samplers", help="DDPM-1000 and DDIM-10/25/50/100 on the last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--features", required=True)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    print(f"threads={torch.get_num_threads()} {load()}")
    {"checkpoints": checkpoints, "nll": nll, "samplers": samplers}[args.command](args)


if __name__ == "__main__":
    main()
