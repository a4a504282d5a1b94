"""python -m difflab.summarize on a training sweep: per-job finals, seeds grouped (mean, 95% t interval), curves."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from scipy.stats import t

from difflab.summarize import main as summarize_main
from difflab.summarize.training import training_clock
from tests.conftest import TINY_TRAIN, run_script


def _final(job: Path, key: str) -> float:
    with open(job / "logs" / "metrics.csv", newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r[key]][-1]


def test_a_four_job_sweep_gives_two_groups_of_two_seeds(tmp_path, capsys):
    run_script("train.py", "-m", *TINY_TRAIN, "callbacks.sample_grid.every_n_steps=100", "seed=0,1",
               "schedule=linear,cosine", "run_id=grid", cwd=tmp_path)
    sweep = tmp_path / "multirun" / "train" / "grid"
    assert summarize_main([str(sweep)]) == 0
    with open(sweep / "summary.csv", newline="") as f:
        rows = {r["schedule"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["cosine", "linear"] and {r["n"] for r in rows.values()} == {"2"}
    jobs = {"linear": (sweep / "0", sweep / "2"), "cosine": (sweep / "1", sweep / "3")}  # seed varies slowest
    for schedule, pair in jobs.items():
        values = [_final(job, "val/loss_ema") for job in pair]
        mean = sum(values) / 2
        s = math.sqrt(sum((v - mean) ** 2 for v in values))  # n - 1 = 1
        assert float(rows[schedule]["val/loss_ema_mean"]) == pytest.approx(mean, rel=1e-9)
        assert float(rows[schedule]["val/loss_ema_ci95"]) == pytest.approx(t.ppf(0.975, 1) * s / math.sqrt(2), rel=1e-9)
        assert float(rows[schedule]["images_seen_mean"]) == 6 * 32  # max_steps x batch_size
    md = (sweep / "summary.md").read_text()
    assert "| override | values |\n|---|---|\n| schedule | linear, cosine |" in md
    assert "seed" not in md.split("## Groups")[0]  # seeds are averaged over, not an override that differs
    assert all((sweep / name).stat().st_size > 0 for name in ("curves_images.png", "curves_time.png"))
    assert "wrote:       " in capsys.readouterr().out


def test_training_time_is_integrated_from_the_logged_throughput():
    rows = [{"step": "0", "train/images_per_sec": ""}, {"step": "1", "train/images_per_sec": "64"},
            {"step": "1", "train/images_per_sec": ""}, {"step": "3", "train/images_per_sec": "32"}]
    # step 0 has no rate: it is counted at step 1's (2 steps of 32 images at 64/s), then steps 2-3 at 32/s
    assert training_clock(rows, 32) == ([1, 3], [1.0, 3.0])
