"""evaluate.py watch=RUN_DIR: each checkpoint of a training run scored once, into <run>/eval and its W&B run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from difflab.errors import ConfigError
from difflab.run_lock import lock_path
from tests.conftest import ROOT, TINY_TRAIN, compose, run_script

KEEP_ALL = [*TINY_TRAIN, "callbacks.model_checkpoint.save_top_k=-1", "callbacks.sample_grid.every_n_steps=100"]


def _watch(run_dir: Path, feature_run: Path, tmp_path: Path, *extra: str) -> dict:
    from difflab.tasks.watch import watch

    return watch(compose("evaluate", [
        f"watch={run_dir}", f"features.path={feature_run}", "metrics=[fid,kid]", "num_samples=16",
        "sampler.num_steps=5", "kid_subsets=5", f"cache_dir={tmp_path / 'reference'}", "poll_seconds=0.2",
        f"output_dir={tmp_path / 'watch'}", *extra,
    ]))


def _scores(run_dir: Path) -> dict[int, dict]:
    return {int(p.stem[5:]): json.loads(p.read_text()) for p in sorted((run_dir / "eval").glob("step_*.json"))}


def _wandb_history(run_dir: Path) -> list[tuple[str, dict]]:
    """(run id, history row) of every W&B offline run in the run dir, read back by ``wandb leet inspect --json``."""
    exe = Path(sys.executable).with_name("wandb")
    rows = []
    for offline in sorted((run_dir / "wandb").glob("offline-run-*")):
        out = subprocess.run([str(exe), "leet", "inspect", "--json", str(offline)], capture_output=True, text=True,
                             check=True).stdout
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        rows += [(offline.name.rsplit("-", 1)[1], r["history"]["item"]) for r in records if r["type"] == "history"]
    return rows


def test_watch_scores_every_checkpoint_once_into_the_run_and_its_wandb_run(feature_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_script("train.py", *KEEP_ALL, "trainer.max_steps=7", "logger=wandb", f"hydra.run.dir={run_dir}")
    latest = _watch(run_dir, feature_run, tmp_path)
    scores = _scores(run_dir)
    assert sorted(scores) == [3, 6, 7]  # step_* every 3 steps, and last.ckpt at the final step 7
    assert [Path(s["ckpt"]).name for s in scores.values()] == ["step_000003.ckpt", "step_000006.ckpt", "last.ckpt"]
    assert all(math.isfinite(s["metrics"]["fid"]) and s["metrics"]["fid"] > 0 for s in scores.values())
    assert latest == pytest.approx(scores[7]["metrics"])
    out = capsys.readouterr().out
    assert out.count("scored:") == 3 and "has ended and every checkpoint is scored" in out
    # W&B: the training run's id, eval/* against eval/global_step, the same values as the files
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    logged = {row["eval/global_step"]: (rid, row) for rid, row in _wandb_history(run_dir) if "eval/global_step" in row}
    assert sorted(logged) == [3, 6, 7] and {rid for rid, _ in logged.values()} == {run_id}
    for step, (_, row) in logged.items():
        assert row["eval/fid"] == pytest.approx(scores[step]["metrics"]["fid"])
        assert row["eval/kid_mean"] == pytest.approx(scores[step]["metrics"]["kid_mean"])
    # the same command again: nothing rescored, nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in (run_dir / "eval").iterdir()}
    _watch(run_dir, feature_run, tmp_path)
    out = capsys.readouterr().out
    assert "skipped:     3 checkpoints already scored (steps 3, 6, 7)" in out and "scored:" not in out
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "eval").iterdir()} == mtimes


def test_watch_beside_a_running_training_ends_by_itself(feature_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *KEEP_ALL, "trainer.max_steps=9",
                              f"hydra.run.dir={run_dir}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    _watch(run_dir, feature_run, tmp_path, "timeout_minutes=2")  # started before the run: it waits for it
    assert not lock_path(run_dir).exists()  # it returned only after the fit had ended (the process may still exit)
    assert train.wait(timeout=120) == 0, train.communicate()[1][-3000:]
    assert sorted(_scores(run_dir)) == [3, 6, 9]
    out = capsys.readouterr().out
    assert out.startswith(f"waiting:     for a training run to start in {run_dir}") and out.count("scored:") == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["ckpt=x.ckpt"], "give ckpt=x.ckpt or watch=.* not both"),
        (["poll_seconds=0"], "poll_seconds must be a positive number, got 0"),
        (["num_samples=1"], "fid and kid need num_samples >= 2, got 1"),
    ],
)
def test_watch_refuses_bad_settings(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):  # before it looks for the run
        _watch(tmp_path / "run", tmp_path / "features", tmp_path, *extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_watch_refuses_a_dir_that_is_no_training_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"watch=.*empty is not a training run dir \(it has no .hydra/config"):
        _watch(tmp_path / "empty", tmp_path / "features", tmp_path)
    with pytest.raises(ConfigError, match=r"watch=.*nowhere: no training run started there in timeout_minutes=0.001"):
        _watch(tmp_path / "nowhere", tmp_path / "features", tmp_path, "timeout_minutes=0.001")
