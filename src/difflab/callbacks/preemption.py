"""Save and stop (and requeue on SLURM) when the scheduler signals the end of a job's time or a preemption."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


def parse_signal(name: str | int) -> signal.Signals:
    """A signal from its name (``SIGUSR2`` or ``USR2``) or number."""
    try:
        if isinstance(name, int):
            return signal.Signals(name)
        return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except (KeyError, ValueError) as err:
        raise ValueError(f"unknown signal {name!r}: use a name such as SIGUSR2, SIGTERM or USR1") from err


class Preemption(L.Callback):
    """On one of ``signals``: finish the current step, write ``<dirpath>/last.ckpt``, stop, and requeue.

    The signal only sets a flag; the decision is taken after an optimizer step, agreed by all ranks
    (one all-reduce of a bool per step), so no rank is left waiting in a collective. On SLURM,
    rank 0 then runs ``scontrol requeue $SLURM_JOB_ID`` for ``requeue_signals`` (the time-limit
    warning that ``hydra/launcher=slurm`` asks for with ``signal_delay_s``; a plain SIGTERM is left
    to the scheduler, which requeues preempted jobs itself). The requeued job composes the same run
    dir and resumes from ``last.ckpt`` there (``resume=auto``).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        signals: list[str] = ("SIGUSR2", "SIGTERM"),
        requeue_signals: list[str] = ("SIGUSR2",),
        requeue: bool = True,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.signals = [parse_signal(s) for s in signals]
        self.requeue_signals = {parse_signal(s) for s in requeue_signals}
        self.requeue = requeue
        self.received: signal.Signals | None = None
        self.stopped_at: int | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # installed last, so these handlers (not Lightning's or submitit's) answer the signals during the fit
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        trainer.should_stop = True
        self.stopped_at = trainer.global_step
        if trainer.is_global_zero:
            print(
                f"preempted by {self.received.name if self.received else 'a signal on another rank'} at step "
                f"{trainer.global_step}: saved {path}; the same command resumes it",
                flush=True,
            )
            self._requeue()

    def _requeue(self) -> None:
        job = os.environ.get("SLURM_ARRAY_JOB_ID") and f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        job = job or os.environ.get("SLURM_JOB_ID")
        if not (self.requeue and job and self.received in self.requeue_signals):
            return
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode == 0:
            print(f"requeued SLURM job {job}", flush=True)
        else:
            log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
