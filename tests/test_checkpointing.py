"""Crash-safe checkpoints: a kill during a save leaves the old file whole; resume=auto skips an unreadable last.ckpt."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

import difflab.checkpointing
from difflab.checkpointing import AtomicCheckpointIO
from difflab.tasks import train
from tests.conftest import TINY_TRAIN, compose, run_script


class Killed(BaseException):
    """Stands in for the signal that ends a process mid-write."""


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "w": torch.arange(4.0)}, path)
    before = path.read_bytes()

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"\x00" * 100)  # part of a checkpoint reaches the disk, then the process is killed
        raise Killed

    monkeypatch.setattr(difflab.checkpointing.torch, "save", dies_halfway)
    with pytest.raises(Killed):
        io.save_checkpoint({"global_step": 6, "w": torch.zeros(4)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 3


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_readable_checkpoint(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    ckpts = run_dir / "checkpoints"
    for name in ("last.ckpt", "step_000006.ckpt"):  # as if killed while writing both (a non-atomic writer)
        _truncate(ckpts / name)
    proc = run_script("train.py", *TINY_TRAIN, "trainer.max_steps=9", f"hydra.run.dir={run_dir}")
    assert "falling back to step_000003.ckpt" in proc.stdout and "truncated" in proc.stdout
    assert "resuming:" in proc.stdout and "step_000003.ckpt" in proc.stdout
    restoring = [line for line in proc.stdout.splitlines() if "Restoring states from the checkpoint path at" in line]
    assert len(restoring) == 1 and "step_000003.ckpt" in restoring[0]  # Lightning's line, once, through Hydra
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 9


def test_resume_refuses_when_no_checkpoint_is_readable(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    for ckpt in (run_dir / "checkpoints").iterdir():
        _truncate(ckpt)
    (run_dir / "done.json").unlink()  # an unfinished run: a finished one is skipped without reading checkpoints
    before = {p: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    proc = run_script("train.py", *TINY_TRAIN, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode != 0 and f"cannot load checkpoint {run_dir / 'checkpoints' / 'last.ckpt'}" in proc.stderr
    assert {p: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == before


def test_pruning_keeps_the_newest_k_periodic_checkpoints_and_the_best(tmp_path):
    """save_top_k=2 of checkpoints every 2 steps keeps step_6 and step_8; best.ckpt holds the state of the lowest
    logged val/loss_ema, whichever step that is (it depends on the CPU's float rounding), and survives the pruning."""
    train(compose("train", [
        *TINY_TRAIN, "trainer.max_steps=8", "trainer.val_check_interval=2",
        "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.model_checkpoint.save_top_k=2",
        "callbacks.sample_grid.every_n_steps=100", "optimizer.lr=1.0",
        f"output_dir={tmp_path}",
    ]))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt", "step_000006.ckpt", "step_000008.ckpt"]
    with open(tmp_path / "logs" / "metrics.csv") as f:  # validation after step s is logged at row step s - 1
        val = {int(row["step"]) + 1: float(row["val/loss_ema"]) for row in csv.DictReader(f) if row["val/loss_ema"]}
    assert sorted(val) == [2, 4, 6, 8]
    best = torch.load(ckpts / "best.ckpt", weights_only=True)
    assert best["global_step"] == min(val, key=val.get)
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 8


def test_a_finished_run_missing_its_best_checkpoint_gets_it_back_on_the_rerun(tmp_path, capsys):
    """A kill while the final best.ckpt was written: the same command restores it from the kept checkpoint with the
    lowest logged val/loss_ema (which one that is depends on float rounding; the test reads the log)."""
    command = [*TINY_TRAIN, "callbacks.model_checkpoint.save_top_k=-1", f"output_dir={tmp_path}"]
    train(compose("train", command))
    ckpts = tmp_path / "checkpoints"
    expected = torch.load(ckpts / "best.ckpt", weights_only=True)["global_step"]
    (ckpts / "best.ckpt").unlink()
    capsys.readouterr()
    train(compose("train", command))
    assert "it was missing from this finished run" in capsys.readouterr().out
    with open(tmp_path / "logs" / "metrics.csv") as f:
        val = {int(row["step"]) + 1: float(row["val/loss_ema"]) for row in csv.DictReader(f) if row["val/loss_ema"]}
    restored = torch.load(ckpts / "best.ckpt", weights_only=True)
    assert restored["global_step"] == min(val, key=val.get) == expected
    assert torch.equal(restored["state_dict"]["ema.module.unet.conv_in.weight"],
                       torch.load(ckpts / f"step_{expected:06d}.ckpt", weights_only=True)["state_dict"][
                           "ema.module.unet.conv_in.weight"])


def test_a_partial_checkpoint_left_by_a_killed_process_is_removed_when_the_run_starts_again(trained_run, tmp_path,
                                                                                          capsys):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = run_dir / "checkpoints" / f".last.ckpt.tmp-{int(dead.stdout)}"
    orphan.write_bytes(b"half a checkpoint")
    train(compose("train", [*TINY_TRAIN, f"output_dir={run_dir}"]))  # a finished run: no step, only the clean-up
    assert not orphan.exists()
    assert f"removed:     {orphan}" in capsys.readouterr().out
