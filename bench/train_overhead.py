"""End-to-end training overhead: the share of `python train.py`'s wall time that is not optimizer steps.

    python bench/train_overhead.py [--rounds 1] [--keep DIR] [-- OVERRIDE ...]   # default: the default run (1,200 steps)

Runs ``python train.py`` as a user would (a fresh process: imports, data, model, every default callback, the
report at the end) with Lightning's SimpleProfiler, and splits the process's wall time into

- optimizer steps: Lightning's ``run_training_batch`` (forward, backward, clipping, AdamW, the EMA update; the
  work a plain PyTorch loop does) plus fetching the batch;
- everything else, by source: startup (process start to the first step), validation, each callback's hooks
  (sample grids, checkpoints, the divergence guard, per-step reseeding, post-hoc EMA, progress), logging and
  the end (last checkpoint, report, exit).

The profiler's own cost (about 20 us per hook) counts as overhead, so the share is an upper bound.
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

ROOT = Path(__file__).resolve().parents[1]
STEP_ACTIONS = ("run_training_batch", "[_TrainingEpochLoop].train_dataloader_next")
"""What a plain loop does too: the optimizer step (forward, backward, optimizer, EMA) and drawing the batch."""


class JsonProfiler(SimpleProfiler):
    """SimpleProfiler that writes {action: [total seconds, calls]} and the wall-clock time of its creation to
    ``path`` at the end of the fit, instead of printing its table."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path, self.created = Path(path), time.time()
        self.first_step: float | None = None

    def start(self, action_name: str) -> None:
        if action_name == "run_training_batch" and self.first_step is None:
            self.first_step = time.time()
        super().start(action_name)

    def describe(self) -> None:
        totals = {k: [sum(v), len(v)] for k, v in self.recorded_durations.items()}
        self.path.write_text(json.dumps({"created": self.created, "first_step": self.first_step, "actions": totals}))


IN_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad")
"""Callback hooks Lightning calls inside run_training_batch: overhead nested in a step (the divergence guard's)."""


def one_run(overrides: list[str], keep: Path | None = None) -> dict[str, float]:
    """Seconds by source of one ``python train.py`` run: ``wall`` (the whole process), ``optimizer steps``, and
    the rest (callbacks by class, validation, startup, end and unattributed) summing to wall - optimizer steps."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "profile.json"
        run_dir = keep or Path(tmp) / "run"
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}",
               "+trainer.profiler._target_=bench.train_overhead.JsonProfiler", f"+trainer.profiler.path={report}"]
        started = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        wall = time.time() - started
        profile = json.loads(report.read_text())
    actions = {k: v[0] for k, v in profile["actions"].items()}
    seconds: dict[str, float] = defaultdict(float)
    for action, total in actions.items():
        if action.startswith("[Callback]"):
            seconds["callback " + action.split("]", 1)[1].split(".")[0].split("{")[0]] += total
    nested = sum(t for a, t in actions.items() if a.startswith("[Callback]") and a.endswith(IN_STEP_HOOKS))
    steps = sum(actions.get(a, 0.0) for a in STEP_ACTIONS) - nested
    seconds["validation (loop, forward passes)"] = sum(
        t for a, t in actions.items() if "validation" in a.lower() and not a.startswith("[Callback]") or a.endswith("val_next")
    )
    seconds["startup (process start to the first step)"] = profile["first_step"] - started
    seconds["end and unattributed (loop hooks, last checkpoint, report, exit)"] = wall - steps - sum(seconds.values())
    return {"wall": wall, "optimizer steps": steps, **seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="write the (last) run here and keep it (e.g. for bench/sampling_speed.py)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args()
    for r in range(args.rounds):
        seconds = one_run(args.overrides, args.keep if r == args.rounds - 1 else None)
        wall = seconds.pop("wall")
        steps = seconds.pop("optimizer steps")
        print(f"round {r}: train.py {' '.join(args.overrides) or '(defaults)'}: wall {wall:.1f} s, optimizer steps "
              f"{steps:.1f} s, not optimizer steps {wall - steps:.1f} s = {100 * (wall - steps) / wall:.1f}%")
        for name, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<55} {value:7.2f} s  {100 * value / wall:5.2f}%")


if __name__ == "__main__":
    main()
