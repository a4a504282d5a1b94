"""The run-dir lock, exercised by real processes: refusal, stale takeover, DDP ranks and children, SLURM requeue."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from difflab.errors import ConfigError
from difflab.run_lock import LOCK_ENV, RunDirLock, RunLockCallback, lock_path

HOST = socket.gethostname()
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", LOCK_ENV)

# Holds the lock of argv[1], says so, and keeps it until a line arrives on stdin.
HOLD = """
import sys
from difflab.run_lock import RunDirLock
lock = RunDirLock(sys.argv[1]).acquire()
print("held" if lock.held else "not held", flush=True)
sys.stdin.readline()
lock.release()
"""

# Tries the lock of argv[1] once; prints whether it was taken and the lock file's record meanwhile.
TRY = """
import json, sys
from difflab.run_lock import RunDirLock, lock_path
with RunDirLock(sys.argv[1]) as lock:
    path = lock_path(sys.argv[1])
    print(json.dumps({"held": lock.held, "record": json.loads(path.read_text()) if path.exists() else None}))
"""


def _env(**extra: str) -> dict[str, str]:
    """This environment without launcher or lock variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, **extra}


def _hold(run_dir: Path, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env))
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.communicate("\n", timeout=30)


def _try(run_dir: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run TRY; returns the finished process and its report (None if it failed)."""
    done = subprocess.run([sys.executable, "-c", TRY, str(run_dir)], capture_output=True, text=True, env=_env(**env),
                          timeout=60)
    return done, json.loads(done.stdout) if done.returncode == 0 else None


def _write_lock(run_dir: Path, **record: object) -> None:
    record = {"host": HOST, "since": "2024-01-01T00:00:00+00:00", "command": "train.py", "token": "theirs", **record}
    lock_path(run_dir).write_text(json.dumps(record))


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_second_process_is_refused_naming_the_holder_and_nothing_is_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "outputs" / "run"
    holder = _hold(run_dir)
    try:
        done, _ = _try(run_dir)
        assert done.returncode != 0
        assert "ConfigError" in done.stderr and f"pid {holder.pid} on host {HOST}" in done.stderr
        assert str(run_dir) in done.stderr and "pick another run_id" in done.stderr
        assert not run_dir.exists()  # the lock lives beside the run dir
    finally:
        _stop(holder)
    assert not lock_path(run_dir).exists()


def test_two_processes_started_together_on_a_stale_lock_one_wins(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    _write_lock(run_dir, pid=_dead_pid())
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for _ in range(2)]
    first_lines = [p.stdout.readline().strip() for p in procs]
    outs = [p.communicate("\n", timeout=30) for p in procs]
    assert sorted(first_lines) == ["", "held"], outs
    assert sorted(p.returncode for p in procs)[1] != 0 and any("is in use" in err for _, err in outs)


def test_lock_of_a_dead_pid_is_taken_over_with_a_message_naming_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    dead = _dead_pid()
    _write_lock(run_dir, pid=dead)
    done, report = _try(run_dir)
    assert done.returncode == 0, done.stderr
    assert report["held"] and report["record"]["pid"] != dead and report["record"]["host"] == HOST
    assert f"pid {dead} on host {HOST}" in done.stderr and "gone" in done.stderr
    assert not lock_path(run_dir).exists()


def test_reused_pid_and_zombie_count_as_gone(tmp_path: Path) -> None:
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits and stays unreaped until wait()
    try:
        while Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1][0] != "Z":
            time.sleep(0.01)
        for name, pid, started in [("reused", os.getpid(), 1), ("zombie", zombie.pid, None)]:
            run_dir = tmp_path / name
            _write_lock(run_dir, pid=pid, proc_start=started)  # a live pid, but not the process that took the lock
            done, report = _try(run_dir)
            assert done.returncode == 0 and report["held"] and f"pid {pid}" in done.stderr, done.stderr
    finally:
        zombie.wait()


def test_sigkilled_holder_leaves_a_lock_the_next_process_takes_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=30)
    assert json.loads(lock_path(run_dir).read_text())["pid"] == holder.pid  # no chance to release
    done, report = _try(run_dir)
    assert done.returncode == 0 and report["held"], done.stderr
    assert f"pid {holder.pid}" in done.stderr


def test_child_with_the_holders_token_joins_and_leaves_the_lock(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    parent = """
import json, os, subprocess, sys
from difflab.run_lock import RunDirLock, lock_path
with RunDirLock(sys.argv[1]) as lock:
    child = subprocess.run([sys.executable, "-c", sys.argv[2], sys.argv[1]], capture_output=True, text=True)
    again = RunDirLock(sys.argv[1]).acquire().held
    print(json.dumps({"pid": os.getpid(), "child": child.stdout, "child_err": child.stderr,
                      "still_locked": lock_path(sys.argv[1]).exists(), "again": again}))
"""
    done = subprocess.run([sys.executable, "-c", parent, str(run_dir), TRY], capture_output=True, text=True,
                          env=_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    child = json.loads(report["child"])
    assert not child["held"] and child["record"]["pid"] == report["pid"]
    assert report["still_locked"], report["child_err"]  # the child's with-block did not remove the holder's lock
    assert not report["again"]  # the holder acquiring again (the Hydra callback, then the task) joins too
    assert not lock_path(run_dir).exists()


def test_foreign_token_in_the_environment_is_still_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    try:
        done, _ = _try(run_dir, **{LOCK_ENV: "not-the-holders"})
        assert done.returncode != 0 and f"pid {holder.pid}" in done.stderr
    finally:
        _stop(holder)


@pytest.mark.parametrize("env", [{"RANK": "1", "WORLD_SIZE": "2"}, {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}])
def test_nonzero_rank_is_not_refused_and_leaves_the_lock(tmp_path: Path, env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    try:
        done, report = _try(run_dir, **env)
        assert done.returncode == 0 and not report["held"], done.stderr
        assert report["record"]["pid"] == holder.pid
        assert json.loads(lock_path(run_dir).read_text())["pid"] == holder.pid
        done, _ = _try(run_dir, RANK="0", WORLD_SIZE="2")  # rank 0 of another launch is refused
        assert done.returncode != 0 and f"pid {holder.pid}" in done.stderr
    finally:
        _stop(holder)


def test_slurm_requeue_on_another_node_takes_over_other_jobs_are_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _write_lock(run_dir, pid=4242, host="node-17.cluster", slurm_job_id="777")
    done, _ = _try(run_dir, SLURM_JOB_ID="778")
    assert done.returncode != 0 and "node-17.cluster" in done.stderr and "another host" in done.stderr
    done, report = _try(run_dir, SLURM_JOB_ID="777")
    assert done.returncode == 0 and report["held"], done.stderr
    assert report["record"]["slurm_job_id"] == "777" and "requeue of SLURM job 777" in done.stderr


def test_live_holder_on_this_host_is_refused_even_in_the_same_slurm_job(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = _hold(run_dir, SLURM_JOB_ID="777")
    try:
        done, _ = _try(run_dir, SLURM_JOB_ID="777")
        assert done.returncode != 0 and f"pid {holder.pid}" in done.stderr
    finally:
        _stop(holder)


def test_release_removes_only_our_own_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOCK_ENV, raising=False)
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir) as lock:
        assert lock.held and lock_path(run_dir).exists() and os.environ[LOCK_ENV]
    assert not lock_path(run_dir).exists() and LOCK_ENV not in os.environ
    lock = RunDirLock(run_dir).acquire()
    _write_lock(run_dir, pid=4242, host="elsewhere")  # rewritten by someone else meanwhile
    lock.release()
    assert json.loads(lock_path(run_dir).read_text())["host"] == "elsewhere"


def test_hydra_callback_locks_before_the_run_dir_exists_and_refuses_with_exit(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOCK_ENV, raising=False)
    run_dir = tmp_path / "outputs" / "run"
    config = OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}}})
    callback = RunLockCallback()
    callback.on_run_start(config)
    assert lock_path(run_dir).exists() and not run_dir.exists()
    assert not RunDirLock(run_dir).acquire().held  # the task's own lock joins the callback's
    callback.on_run_end(config)
    assert not lock_path(run_dir).exists()
    holder = _hold(run_dir)
    try:
        with pytest.raises(SystemExit, match=f"pid {holder.pid}") as refused:
            RunLockCallback().on_run_start(config)
        assert isinstance(refused.value.__cause__, ConfigError) and not run_dir.exists()
    finally:
        _stop(holder)


@pytest.mark.slow
def test_two_train_py_on_one_run_id_the_second_is_refused_and_the_first_is_whole(tmp_path: Path) -> None:
    """The issue's case: two `python train.py run_id=X` with different lr. The second exits non-zero naming the
    first's pid; the run dir then holds one run: its lr in the checkpoint, one metrics row per logged step."""
    from tests.conftest import ROOT, TINY_TRAIN

    args = [*TINY_TRAIN, "trainer.max_steps=40", "run_id=X", "hydra.job.chdir=false"]
    env = {k: v for k, v in os.environ.items() if k != LOCK_ENV}
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "optimizer.lr=1e-3"], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = tmp_path / "outputs" / "train" / ".X.lock"
    deadline = time.time() + 60
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # Paused while the second starts, so a loaded machine cannot let the first finish before the second looks
    # at the lock (a stopped process is alive: its lock is still held).
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "optimizer.lr=5e-4"], cwd=tmp_path,
                                env=env, capture_output=True, text=True)
    finally:
        first.send_signal(signal.SIGCONT)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert second.returncode != 0 and f"held by pid {first.pid}" in second.stderr + second.stdout
    run = tmp_path / "outputs" / "train" / "X"
    ckpt = torch_load(run / "checkpoints" / "last.ckpt")
    assert ckpt["hyper_parameters"]["run_config"]["optimizer"]["lr"] == 1e-3
    assert "optimizer.lr=1e-3" in (run / ".hydra" / "overrides.yaml").read_text()
    with open(run / "logs" / "metrics.csv") as f:
        steps = [row["step"] for row in csv.DictReader(f) if row["train/loss"]]
    assert len(steps) == len(set(steps)) == 40  # one training loss per step: nothing logged twice
    assert not lock.exists()  # released at the end


def torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
