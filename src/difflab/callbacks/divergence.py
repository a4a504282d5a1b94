"""Catch a diverging run within the step it happens: a non-finite loss or gradient, or a loss spike; then act."""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from torch import Tensor

from difflab.checkpointing import newest_readable, read_checkpoint_file
from difflab.errors import ConfigError

Action = Literal["stop", "skip", "rollback"]


class DivergenceError(RuntimeError):
    """Training stopped because the loss or the gradients diverged (the message names the step and what)."""


class DivergenceGuard(L.Callback):
    """After each backward pass and before the optimizer step, check the step's loss and gradients; act on trouble.

    Trouble is a non-finite loss, a non-finite gradient, or (``z_score`` set) a loss more than
    ``z_score`` standard deviations above the mean of the last ``window`` healthy steps. The loss is
    the optimizer step's (the mean over accumulated micro-batches, averaged over DDP ranks), so every
    rank sees the same numbers and takes the same decision. ``action``:

    - ``stop``: raise :class:`DivergenceError` naming the step; the weights never saw the bad step,
      so the run dir's checkpoints are all from healthy steps.
    - ``skip``: drop the step's gradients, so the optimizer step leaves the weights and the optimizer
      state as they were, and the EMA does not move (``DiffusionModule`` updates it only after a step
      that had gradients). The step still counts (global step, LR schedule, data position advance).
    - ``rollback``: load the weights, EMA and optimizer state of the newest readable checkpoint in
      ``checkpoint_dir`` (weights_only), multiply the learning rate by ``lr_factor``, drop the step's
      gradients and go on with the next batch. Checkpoints on disk rather than a snapshot in memory:
      they exist anyway, so a healthy step costs nothing, where a snapshot holds a second copy of the
      weights, EMA and Adam moments (4x the parameters) and copies it every few steps.

    After ``max_events`` skipped or rolled-back steps in a run the guard stops. Each event goes to
    the loggers (``divergence/events``, ``divergence/loss``) and as one JSON line to ``events_path``.
    Under ``16-mixed`` a non-finite gradient is the GradScaler's to handle (it skips the step and
    lowers the scale), so only the loss is checked; the guard's own state (the loss window, the
    event count) is saved in checkpoints.
    """

    def __init__(
        self,
        events_path: str | os.PathLike,
        checkpoint_dir: str | os.PathLike,
        action: Action = "stop",
        z_score: float | None = None,
        window: int = 100,
        lr_factor: float = 0.5,
        max_events: int = 10,
    ) -> None:
        if action not in get_args(Action):
            raise ConfigError(f"callbacks.divergence.action={action!r} is not an option: use one of {get_args(Action)}")
        if z_score is not None and z_score <= 0:
            raise ConfigError(f"callbacks.divergence.z_score must be > 0 (or null: no spike check), got {z_score}")
        if window < 2:
            raise ConfigError(f"callbacks.divergence.window must be >= 2 steps, got {window}")
        if not 0 < lr_factor <= 1:
            raise ConfigError(f"callbacks.divergence.lr_factor must lie in (0, 1], got {lr_factor}")
        if max_events < 0:
            raise ConfigError(f"callbacks.divergence.max_events must be >= 0, got {max_events}")
        self.events_path, self.checkpoint_dir = Path(events_path), Path(checkpoint_dir)
        self.action, self.z_score, self.window, self.lr_factor = action, z_score, window, lr_factor
        self.max_events = max_events
        self.history: deque[float] = deque(maxlen=window)
        self.events = 0
        self._losses: list[Tensor] = []

    def on_before_backward(self, trainer: L.Trainer, module: L.LightningModule, loss: Tensor) -> None:
        self._losses.append(loss.detach() / _loss_scale(trainer))  # each micro-batch's loss / accumulation

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step + 1  # the optimizer step about to happen; checkpoint step_N holds steps 1..N
        loss, bad_grads = self._reduced(trainer, module)
        trouble, z = None, None
        if not math.isfinite(loss):
            trouble = "non-finite loss"
        elif bad_grads:
            trouble = "non-finite gradient"
        elif self.z_score is not None and len(self.history) == self.window:
            mean = sum(self.history) / self.window
            std = math.sqrt(sum((h - mean) ** 2 for h in self.history) / (self.window - 1))
            z = (loss - mean) / std if std > 0 else 0.0
            if z > self.z_score:
                trouble = f"loss spike (z = {z:.1f} > {self.z_score} over the last {self.window} steps)"
        if trouble is None:
            self.history.append(loss)
            return
        self.events += 1
        action = self.action if self.events <= self.max_events else "stop"
        event: dict[str, Any] = {"step": step, "event": trouble.split(" (")[0], "loss": _json_float(loss), "z": z,
                                 "action": action, "time": time.time()}
        where = f"step {step}: {trouble}, loss {loss}"
        if action == "stop":
            self._record(trainer, event)
            limit = f", after {self.max_events} skipped or rolled-back steps (callbacks.divergence.max_events)"
            raise DivergenceError(
                f"training diverged at {where}" + (limit if self.events > self.max_events else "")
                + f"; stopped before the weights took the step (callbacks.divergence.action={self.action}). "
                f"Checkpoints in {self.checkpoint_dir} hold healthy steps only: resume one with a lower optimizer.lr, "
                "or set callbacks.divergence.action=skip or rollback"
            )
        if action == "rollback":
            event.update(self._rollback(trainer, module, optimizer, where))
        for p in module.parameters():  # no gradients: the optimizer step changes nothing, and the EMA stays
            p.grad = None
        self._record(trainer, event)

    def _reduced(self, trainer: L.Trainer, module: L.LightningModule) -> tuple[float, bool]:
        """The step's loss (the same on every rank) and whether any rank has a non-finite gradient."""
        loss = torch.stack(self._losses).sum() if self._losses else torch.zeros((), device=module.device)
        self._losses = []
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        check = grads and getattr(trainer.precision_plugin, "scaler", None) is None
        bad = ~torch.stack(torch._foreach_norm(grads)).isfinite().all() if check else torch.zeros((), dtype=torch.bool)
        stats = trainer.strategy.reduce(torch.stack([loss.float(), bad.float().to(loss.device)]), reduce_op="mean")
        loss_value, bad_share = stats.tolist()
        return loss_value, bad_share > 0

    def _rollback(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any, where: str) -> dict[str, Any]:
        """Load the newest readable checkpoint's weights, EMA and optimizer state; scale the learning rate."""
        path = None
        if trainer.is_global_zero:  # one rank picks, so every rank loads the same file
            try:
                path = str(newest_readable(self.checkpoint_dir / "last.ckpt", read_checkpoint_file)[0])
            except ConfigError:
                path = None
        path = trainer.strategy.broadcast(path, src=0)
        if path is None:
            raise DivergenceError(
                f"training diverged at {where}; action=rollback found no readable checkpoint in "
                f"{self.checkpoint_dir} to return to (none written yet): stopped"
            )
        ckpt = read_checkpoint_file(path)
        module.load_state_dict(ckpt["state_dict"])
        lrs = [group["lr"] for group in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer_states"][0])
        for group, lr in zip(optimizer.param_groups, lrs):  # the current schedule's rate, lowered
            group["lr"] = lr * self.lr_factor
            if "initial_lr" in group:
                group["initial_lr"] *= self.lr_factor
        for config in trainer.lr_scheduler_configs:  # closed-form schedules recompute from base_lrs
            config.scheduler.base_lrs = [lr * self.lr_factor for lr in config.scheduler.base_lrs]
        print(f"divergence at {where}: rolled back to {path} (step {ckpt['global_step']}), "
              f"learning rate x{self.lr_factor} = {optimizer.param_groups[0]['lr']:.3g}", flush=True)
        lr = optimizer.param_groups[0]["lr"]
        return {"checkpoint": str(path), "checkpoint_step": int(ckpt["global_step"]), "lr": lr}

    def _record(self, trainer: L.Trainer, event: dict[str, Any]) -> None:
        """One JSON line in ``events_path`` and the loggers' ``divergence/*`` metrics (rank 0)."""
        if not trainer.is_global_zero:
            return
        self.events_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.events_path, "a") as f:
            f.write(json.dumps(event) + "\n")
        loss = event["loss"] if isinstance(event["loss"], float) else float(event["loss"])
        for logger in trainer.loggers:
            logger.log_metrics({"divergence/events": float(self.events), "divergence/loss": loss}, step=event["step"])

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "events": self.events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.window)
        self.events = int(state["events"])


def _loss_scale(trainer: L.Trainer) -> float:
    """The GradScaler's current scale under 16-mixed (the hook sees the scaled loss), else 1."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0


def _json_float(x: float) -> float | str:
    """x, or its name when JSON has no number for it (nan, inf)."""
    return x if math.isfinite(x) else str(x)
