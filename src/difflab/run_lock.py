"""One process (and its DDP ranks) per run dir: a lock file beside the run dir, held for the whole fit.

Two commands on one run dir would interleave their checkpoints, ``.hydra/`` files and metrics. The
lock is ``<parent>/.<run dir name>.lock``, *beside* the run dir, so it can be taken before the run
dir exists and a refused command writes nothing into the run dir. It holds JSON: pid, host, since,
the command, SLURM_JOB_ID, the process's start time (``/proc/<pid>/stat``, against pid reuse) and a
random token. It is created atomically (``O_CREAT | O_EXCL``); inspecting and taking over a stale
lock happen under ``flock`` of the parent dir where the file system supports it, so two commands
started together cannot both take over the same stale lock.

Who may go on when the lock file exists:

* a process whose environment carries the lock's token (``DIFFLAB_RUN_LOCK``, exported by the
  holder): the holder itself acquiring again (the Hydra callback, then the task) and every process
  it starts (Lightning's ``ddp`` re-launch, ``ddp_spawn``, subprocesses) joins; it never removes the lock;
* a non-zero rank of a launch that starts all ranks itself (``RANK`` with ``WORLD_SIZE > 1``:
  torchrun; ``SLURM_PROCID`` with ``SLURM_NTASKS > 1``: srun): only global rank 0 takes the lock,
  the others neither check nor take it;
* the holder is gone: on this host its pid is dead, a zombie, or reused by a process started at
  another time; on another host, it ran under this process's SLURM_JOB_ID (a requeue of the same
  job, maybe on another node). The lock is taken over with a warning naming the old holder. On the
  same host a live holder is refused even under the same SLURM job: two steps of one job on one
  run dir are the case this lock is for, and a requeue only starts once the old job has ended.

Anyone else gets a :class:`~difflab.errors.ConfigError` naming the holder and what to do.
The lock is released (the file removed, only if it still holds our token) by ``release()``, on
leaving a ``with`` block (normal end, exception, or the preemption callback's orderly stop), and at
interpreter exit as a fallback. A process killed outright leaves a lock that the next command takes over.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from difflab.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_ENV = "DIFFLAB_RUN_LOCK"
"""The environment variable by which the holder's token reaches the processes it starts."""

_PARTIAL_READ_TRIES = 5  # a lock read before its writer finished (no flock on this file system): retry briefly


def lock_path(run_dir: str | os.PathLike) -> Path:
    """The lock file of ``run_dir``: ``<parent>/.<name>.lock`` (symlinks resolved, so one dir has one lock)."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / f".{run_dir.name}.lock"


def _proc_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of ``pid`` from ``/proc``; None if it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": the command name may hold spaces
    return fields[0], int(fields[19])


def _alive(pid: int, start: int | None) -> bool:
    """Whether ``pid`` on this host is still the process that was started at ``start`` (when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    stat = _proc_start(pid)
    if stat is None:  # no /proc to ask, or hidden from us (hidepid): trust os.kill
        return True
    state, started = stat
    return state not in ("Z", "X") and (start is None or started == start)


def _describe(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}{job} "
            f"(command: {holder.get('command')})")


def _read(path: Path) -> dict[str, Any] | None:
    """The lock record in ``path``; None if there is no file; {} if it holds no valid record (even after retries)."""
    for attempt in range(_PARTIAL_READ_TRIES):
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("pid"), int) and record.get("token"):
            return record
        time.sleep(0.1 * (attempt + 1))
    return {}


def lock_holder(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The record of whoever holds ``run_dir``'s lock: None without a lock file, {} while one is being written."""
    return _read(lock_path(run_dir))


def is_locked(run_dir: str | os.PathLike) -> bool:
    """Whether a process holds ``run_dir``'s lock: a live one on this host, or any on another host (which cannot be
    checked from here; its lock goes when that run ends), or one that is taking it right now."""
    holder = lock_holder(run_dir)
    if holder is None:
        return False
    if not holder or holder.get("host") != socket.gethostname():
        return True
    return _alive(holder["pid"], holder.get("proc_start"))


@contextmanager
def _dir_locked(directory: Path) -> Iterator[None]:
    """Hold ``flock`` on ``directory`` (serialises lock checks on this host); a no-op where it is not supported."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # e.g. Lustre mounted without flock: O_EXCL creation still keeps the lock exclusive
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _nonzero_rank() -> str | None:
    """The variable saying this process is a non-zero rank of a launcher that starts every rank, e.g. ``RANK=1``."""
    for rank, size in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if int(os.environ.get(size, "1")) > 1 and int(os.environ.get(rank, "0")) != 0:
            return f"{rank}={os.environ[rank]}"
    return None


class RunDirLock:
    """The lock of one run dir: ``with RunDirLock(run_dir): ...`` or ``acquire()`` / ``release()``.

    ``held`` is True while this object owns the lock file; a joining DDP rank or child process, and
    a non-zero rank, go on with ``held`` False and leave the file alone.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = lock_path(run_dir)
        self.held = False
        self._token = uuid.uuid4().hex
        self._pid = os.getpid()
        self._previous_env: str | None = None

    def acquire(self) -> RunDirLock:
        """Take the lock, join it (same token in the environment), or skip it (non-zero rank); else ConfigError."""
        if self.held:
            return self
        rank = _nonzero_rank()
        if rank:
            log.debug("%s: not taken by %s (rank 0 holds it)", self.path, rank)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _dir_locked(self.path.parent):
            while True:
                holder = _read(self.path)
                if holder and holder["token"] == os.environ.get(LOCK_ENV):
                    return self  # the holder itself, or a process it started: part of the same run
                if holder is not None:
                    self._take_over(holder)
                try:
                    self._create()
                    break
                except FileExistsError:  # taken meanwhile (only where flock is not supported): look again
                    continue
        self.held = True
        self._previous_env = os.environ.get(LOCK_ENV)
        os.environ[LOCK_ENV] = self._token
        atexit.register(self.release)
        return self

    def _take_over(self, holder: dict[str, Any]) -> None:
        """Remove the lock of a holder that is gone (with a warning naming it); refuse one that may still run."""
        here, job = socket.gethostname(), os.environ.get("SLURM_JOB_ID")
        if not holder:
            reason = "it holds no lock record: its writer died while taking it"
        elif holder.get("host") == here and not _alive(holder["pid"], holder.get("proc_start")):
            reason = "that process is gone"
        elif holder.get("host") != here and job and holder.get("slurm_job_id") == job:
            reason = f"this is a requeue of SLURM job {job}"
        else:
            elsewhere = " (another host: whether it still runs cannot be checked from here)"
            raise ConfigError(
                f"run dir {self.run_dir} is in use: {self.path} is held by {_describe(holder)}"
                f"{elsewhere if holder.get('host') != here else ''}. Wait for that run to end, pick another "
                f"run_id, or remove {self.path} if that process is truly gone (nothing was written)"
            )
        log.warning("%s: taking over the lock of %s: %s", self.path, _describe(holder) if holder else "?", reason)
        self.path.unlink(missing_ok=True)

    def _create(self) -> None:
        record = {
            "pid": self._pid,
            "host": socket.gethostname(),
            "since": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "proc_start": stat[1] if (stat := _proc_start(self._pid)) else None,
            "run_dir": str(self.run_dir),
            "token": self._token,
        }
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    def release(self) -> None:
        """Remove the lock file if this object holds it and it still holds our token; idempotent."""
        if not self.held or os.getpid() != self._pid:  # a forked child never releases its parent's lock
            return
        self.held = False
        atexit.unregister(self.release)
        if os.environ.get(LOCK_ENV) == self._token:
            if self._previous_env is None:
                os.environ.pop(LOCK_ENV)
            else:
                os.environ[LOCK_ENV] = self._previous_env
        with _dir_locked(self.path.parent):
            holder = _read(self.path)
            if holder and holder["token"] == self._token:
                self.path.unlink()
            elif holder is not None:
                log.warning("%s: left in place, it now belongs to %s", self.path, _describe(holder) if holder else "?")

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunLockCallback(Callback):
    """Hydra callback: lock ``hydra.run.dir`` (a sweep: ``hydra.sweep.dir``) before Hydra writes anything there.

    Hydra turns exceptions in callbacks into warnings, so a refusal exits (status 1) with the message.
    The task's own ``RunDirLock`` on the same dir then joins this one through the environment token.
    """

    def __init__(self) -> None:
        self.lock: RunDirLock | None = None

    def _acquire(self, config: DictConfig, key: str) -> None:
        try:
            self.lock = RunDirLock(OmegaConf.select(config, key)).acquire()
        except ConfigError as err:
            raise SystemExit(f"Error: {err}") from err

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._acquire(config, "hydra.run.dir")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._acquire(config, "hydra.sweep.dir")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()
