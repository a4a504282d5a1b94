"""End-to-end training overhead: the share of `python train.py`'s wall time that is not optimizer steps.

    python -m bench.train_overhead [--scale 20] [--keep DIR] [-- OVERRIDE ...]

Runs ``python train.py`` as a user would (a fresh process: imports, data, model, every default callback, the
report at the end) under Lightning's SimpleProfiler, at the default settings shortened ``--scale`` times: max_steps
and every interval (validation, sample grids, checkpoints, post-hoc EMA snapshots) divided by it, so the short
run has exactly the default run's events (4 validations, 4 grids, ...) over fewer steps. Its wall time splits into

- optimizer steps: Lightning's ``run_training_batch`` (forward, backward, clipping, AdamW, the EMA update: what a
  plain PyTorch loop does) and drawing the batch, less the callback hooks nested in it;
- per-step overhead: the callbacks that run every step (divergence guard, reseeding, post-hoc EMA, progress) and
  Lightning's loop and logging between steps;
- per-run overhead: startup (process start to the first step), validation, sample grids, checkpoints, the end.

The default run is then extrapolated: its per-run overhead is the short run's (the same events), its steps and
per-step overhead scale with max_steps. The profiler's own cost (~20 us per hook) counts as overhead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from lightning.pytorch.profilers import SimpleProfiler
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import compose  # noqa: E402

STEP_ACTIONS = ("run_training_batch", "[_TrainingEpochLoop].train_dataloader_next")
"""What a plain loop does too: the optimizer step (forward, backward, optimizer, EMA) and drawing the batch."""
IN_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad")
"""Callback hooks Lightning calls inside run_training_batch: overhead nested in a step (the divergence guard's)."""
PER_RUN_CALLBACKS = ("SampleGrid", "PeriodicCheckpoint", "ModelCheckpoint", "RichModelSummary", "ModelSummary")
"""Callbacks whose cost comes with events (grids, saves, the summary), not with every step."""
INTERVALS = ("trainer.val_check_interval", "callbacks.sample_grid.every_n_steps",
             "callbacks.model_checkpoint.every_n_train_steps", "callbacks.posthoc_ema.every_n_steps")


class JsonProfiler(SimpleProfiler):
    """SimpleProfiler writing {action: [total seconds, calls]}, the wall-clock times of the first step and of the
    fit's end to ``path`` instead of printing its table."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = Path(path)
        self.first_step: float | None = None

    def start(self, action_name: str) -> None:
        if action_name == "run_training_batch" and self.first_step is None:
            self.first_step = time.time()
        super().start(action_name)

    def describe(self) -> None:
        totals = {k: [sum(v), len(v)] for k, v in self.recorded_durations.items()}
        self.path.write_text(json.dumps({"first_step": self.first_step, "fit_end": time.time(), "actions": totals}))


def short_overrides(overrides: list[str], scale: int) -> tuple[list[str], int]:
    """train.py overrides of the short run (max_steps and the intervals divided by ``scale``), and the full run's
    max_steps."""
    cfg = compose("train", [*overrides, "output_dir=unused"])
    steps = int(cfg.trainer.max_steps)
    short = [f"trainer.max_steps={steps // scale}"]
    for key in INTERVALS:
        value = OmegaConf.select(cfg, key)
        if value:
            short.append(f"{key}={max(1, int(value) // scale)}")
    return [*overrides, *short], steps


def profile_run(overrides: list[str], keep: Path | None) -> dict[str, float]:
    """Seconds of one ``python train.py`` run by part: wall, steps, per-step and per-run overheads by source."""
    with tempfile.TemporaryDirectory() as tmp:
        report, run_dir = Path(tmp) / "profile.json", keep or Path(tmp) / "run"
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}",
               "+trainer.profiler._target_=bench.train_overhead.JsonProfiler", f"+trainer.profiler.path={report}"]
        started = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        wall = time.time() - started
        profile = json.loads(report.read_text())
    actions = {k: v[0] for k, v in profile["actions"].items()}
    parts: dict[str, float] = defaultdict(float)
    for action, total in actions.items():
        if action.startswith("[Callback]"):
            name = action.split("]", 1)[1].split(".")[0].split("{")[0]
            parts[f"{'run' if name in PER_RUN_CALLBACKS else 'step'}: callback {name}"] += total
    nested = sum(t for a, t in actions.items() if a.startswith("[Callback]") and a.endswith(IN_STEP_HOOKS))
    steps = sum(actions.get(a, 0.0) for a in STEP_ACTIONS) - nested
    parts["run: validation"] = sum(t for a, t in actions.items() if not a.startswith("[Callback]")
                                   and ("validation" in a.lower() or a.endswith("val_next")))
    parts["run: startup (process start to the first step)"] = profile["first_step"] - started
    parts["run: end (last checkpoint, report, exit)"] = started + wall - profile["fit_end"]
    fit = profile["fit_end"] - profile["first_step"]
    parts["step: loop, logging (unattributed)"] = fit - steps - sum(
        v for k, v in parts.items() if not k.startswith("run: startup") and not k.startswith("run: end"))
    return {"wall": wall, "optimizer steps": steps, **parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=20, help="the short run has max_steps / scale steps")
    parser.add_argument("--keep", type=Path, help="write the short run here and keep it")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args()
    overrides, full_steps = short_overrides(args.overrides, args.scale)
    seconds = profile_run(overrides, args.keep)
    wall, steps = seconds.pop("wall"), seconds.pop("optimizer steps")
    short_steps = full_steps // args.scale
    print(f"short run: train.py {' '.join(overrides)}\n  wall {wall:.1f} s, {short_steps} optimizer steps "
          f"{steps:.1f} s ({steps / short_steps:.3f} s/step), not optimizer steps {wall - steps:.1f} s")
    full = {k: v * (args.scale if k.startswith("step:") else 1) for k, v in seconds.items()}
    full_wall = steps * args.scale + sum(full.values())
    print(f"the full run ({full_steps} steps), extrapolated: wall {full_wall:.0f} s, not optimizer steps "
          f"{sum(full.values()):.1f} s = {100 * sum(full.values()) / full_wall:.2f}%")
    for name, value in sorted(full.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<58} {value:7.2f} s  {100 * value / full_wall:5.2f}%   (short run: {seconds[name]:.2f} s)")


if __name__ == "__main__":
    main()
