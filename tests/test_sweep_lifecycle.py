"""The life of a sweep (docs/scaling.md): a dry run, a run killed mid-sweep, the same command finishing it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_TRAIN, run_script

SWEEP = [*TINY_TRAIN, "trainer.max_steps=9", "seed=0,1,2", "run_id=life"]


def _done(sweep: Path, job: int) -> dict:
    return json.loads((sweep / str(job) / "done.json").read_text())


def _deterministic(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k != "train/images_per_sec"}  # a timing


@pytest.mark.slow
def test_a_killed_sweep_finishes_like_an_uninterrupted_one(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir(), killed.mkdir()
    run_script("train.py", "-m", *SWEEP, cwd=reference)
    expected = {job: _done(reference / "multirun" / "train" / "life", job) for job in range(3)}

    sweep = killed / "multirun" / "train" / "life"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", *SWEEP], cwd=killed,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    ckpts = sweep / "1" / "checkpoints"
    while not (ckpts / "last.ckpt").exists() and proc.poll() is None:  # written atomically at step 3
        assert time.time() < deadline
        time.sleep(0.02)
    proc.kill()  # SIGKILL during job 2 (num 1): no handler runs, its locks stay behind
    proc.wait()
    assert (sweep / "0" / "done.json").is_file() and not (sweep / "1" / "done.json").exists()
    assert not (sweep / "2").exists()
    first_job = (sweep / "0" / "checkpoints" / "last.ckpt").stat().st_mtime_ns

    rerun = run_script("train.py", "-m", *SWEEP, cwd=killed)
    value = expected[0]["value"]
    assert f"skipped:     multirun/train/life/0 (done: val/loss_ema={value})" in rerun.stdout
    assert "resuming:    multirun/train/life/1/checkpoints/last.ckpt" in rerun.stdout
    assert "resuming:    multirun/train/life/2" not in rerun.stdout  # job 3 starts
    assert "run dir:     multirun/train/life/2" in rerun.stdout
    assert (sweep / "0" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == first_job  # job 0 did not train
    for job in range(3):
        done = _done(sweep, job)
        assert done["global_step"] == 9 and done["optimized_metric"] == "val/loss_ema"
        assert done["value"] == expected[job]["value"]  # bit-identical: what the sweeper got
        assert _deterministic(done["metrics"]) == _deterministic(expected[job]["metrics"])
    assert len({_done(sweep, job)["value"] for job in range(3)}) == 3  # three seeds, three results

    # a finished job of another experiment under the same run_id is refused, naming the difference
    other = run_script("train.py", "-m", *SWEEP, "objective=x0", cwd=killed, check=False)
    assert other.returncode != 0 and "other objective settings than this command (objective: v -> x0)" in other.stderr


@pytest.mark.slow
def test_rerun_of_a_finished_optuna_sweep_returns_the_recorded_values(tmp_path):
    """The study is in SQLite (conf/hparams_search/optuna.yaml); the rerun's trials, drawn by the same seeded
    sampler (all startup trials here), land in the same job dirs and are answered from their markers."""
    import optuna

    db = tmp_path / "study.db"
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=10",
            f"hydra.sweeper.storage=sqlite:///{db}", *TINY_TRAIN, "trainer.max_steps=3", "run_id=opt"]
    run_script("train.py", *args, cwd=tmp_path)
    sweep = tmp_path / "multirun" / "train" / "opt"
    mtimes = [(sweep / str(job) / "checkpoints" / "last.ckpt").stat().st_mtime_ns for job in range(2)]
    rerun = run_script("train.py", *args, cwd=tmp_path)
    assert rerun.stdout.count("skipped:     multirun/train/opt/") == 2 and "run dir:" not in rerun.stdout
    assert [(sweep / str(job) / "checkpoints" / "last.ckpt").stat().st_mtime_ns for job in range(2)] == mtimes
    trials = optuna.load_study(study_name="difflab_train", storage=f"sqlite:///{db}").trials
    assert len(trials) == 4
    assert [t.params for t in trials[2:]] == [t.params for t in trials[:2]]
    assert [t.value for t in trials[2:]] == [t.value for t in trials[:2]] == [_done(sweep, j)["value"] for j in (0, 1)]


def test_dry_run_lists_every_job_and_names_the_failing_one(tmp_path):
    started = time.time()
    proc = run_script("train.py", "-m", *TINY_TRAIN, "trainer=ddp_cpu", "dataset.batch_size=30,31,32", "run_id=dry",
                      "dry_run=true", cwd=tmp_path, check=False)
    assert time.time() - started < 60
    assert proc.returncode == 1
    lines = [line for line in proc.stdout.splitlines() if line.startswith("dry run:")]
    assert lines == [
        "dry run:     multirun/train/dry/0  dataset.batch_size=30  OK (new)",
        "dry run:     multirun/train/dry/1  dataset.batch_size=31  FAIL: dataset.batch_size=31 (the global batch per "
        "optimizer step) is not divisible by world_size=2 x trainer.accumulate_grad_batches=1 = 2: use a multiple of 2",
        "dry run:     multirun/train/dry/2  dataset.batch_size=32  OK (new)",
        "dry run:     3 jobs checked, 1 would fail: multirun/train/dry/1; nothing trained",
    ]
    sweep = tmp_path / "multirun" / "train" / "dry"
    for job in ("0", "1", "2"):  # only what Hydra writes for every job
        assert sorted(p.name for p in (sweep / job).iterdir()) == [".hydra", "train.log"]
    assert not (tmp_path / "outputs").exists()


def test_dry_run_of_a_single_run_fails_with_the_reason(tmp_path):
    proc = run_script("train.py", *TINY_TRAIN, "schedule.zero_terminal_snr=true", "objective=eps", "dry_run=true",
                      "run_id=one", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "schedule.zero_terminal_snr=true needs objective=v" in proc.stderr
    ok = run_script("train.py", *TINY_TRAIN, "schedule.zero_terminal_snr=true", "objective=v", "dry_run=true",
                    "run_id=one", cwd=tmp_path)
    assert "dry run:     outputs/train/one  OK (new)" in ok.stdout
    assert sorted(p.name for p in (tmp_path / "outputs" / "train" / "one").iterdir()) == [".hydra", "train.log"]
