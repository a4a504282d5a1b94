"""The divergence guard on injected trouble: a NaN pixel, an inf gradient, a loss spike; stop, skip and rollback."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from difflab.callbacks.divergence import DivergenceError
from difflab.errors import ConfigError
from difflab.tasks import train
from tests.conftest import TINY_TRAIN, compose, run_script


class Poison(L.Callback):
    """Injects trouble into the optimizer steps ``steps`` (1-based) on ``rank`` (None: every rank).

    ``nan_pixel``: one pixel of the batch is NaN (a corrupt image); ``inf_grad``: one gradient entry is
    inf while the loss stays finite; ``scale``: the batch is multiplied by 1000 (a finite loss spike).
    """

    def __init__(self, steps: list[int], kind: str = "nan_pixel", rank: int | None = None) -> None:
        self.steps, self.kind, self.rank = list(steps), kind, rank

    def _now(self, trainer: L.Trainer) -> bool:
        return trainer.global_step + 1 in self.steps and self.rank in (None, trainer.global_rank)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._now(trainer) and self.kind == "nan_pixel":
            batch[0][0, 0, 0, 0] = float("nan")
        elif self._now(trainer) and self.kind == "scale":
            batch[0].mul_(1000)

    def on_after_backward(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._now(trainer) and self.kind == "inf_grad":
            next(p for p in module.net.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


class Snapshots(L.Callback):
    """Copies of the weights, EMA and optimizer state before and after each optimizer step, by step (1-based)."""

    latest: Snapshots | None = None
    """The newest instance (the one Hydra built for the run in this process)."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, Any]] = {}
        self.after: dict[int, dict[str, Any]] = {}
        Snapshots.latest = self

    @staticmethod
    def _copy(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
        return {"state_dict": copy.deepcopy(module.state_dict()),
                "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict())}

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.before[trainer.global_step + 1] = self._copy(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.after[trainer.global_step] = self._copy(trainer, module)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _run(tmp_path: Path, *overrides: str, poison: str = "[5]", kind: str = "nan_pixel") -> None:
    """Train 8 steps (checkpoints every 3) with trouble at the ``poison`` steps; ``Snapshots.latest`` records them."""
    train(compose("train", [
        *TINY_TRAIN, "trainer.max_steps=8", "trainer.val_check_interval=8", "callbacks.sample_grid.every_n_steps=100",
        "+callbacks.poison._target_=tests.test_divergence.Poison", f"+callbacks.poison.steps={poison}",
        f"+callbacks.poison.kind={kind}", "+callbacks.snapshots._target_=tests.test_divergence.Snapshots",
        f"output_dir={tmp_path}", *overrides,
    ]))


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def _ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize(("kind", "what"), [("nan_pixel", "non-finite loss"), ("inf_grad", "non-finite gradient")])
def test_stop_names_the_step_and_keeps_only_healthy_checkpoints(tmp_path, kind, what):
    with pytest.raises(DivergenceError, match=f"training diverged at step 5: {what}"):
        _run(tmp_path, kind=kind)
    assert [(e["step"], e["event"], e["action"]) for e in _events(tmp_path)] == [(5, what, "stop")]
    last = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3  # nothing was saved after the trouble
    weights = [v for v in last["state_dict"].values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert all(w.isfinite().all() for w in weights)
    metrics = (tmp_path / "logs" / "metrics.csv").read_text()
    assert "divergence/events" in metrics


def test_skip_leaves_weights_ema_and_optimizer_unchanged_then_stops_after_max_events(tmp_path):
    with pytest.raises(DivergenceError, match=r"step 7: non-finite loss.*after 1 skipped or rolled-back steps"):
        _run(tmp_path, "callbacks.divergence.action=skip", "callbacks.divergence.max_events=1", poison="[5, 7]")
    events = _events(tmp_path)
    assert [(e["step"], e["action"]) for e in events] == [(5, "skip"), (7, "stop")]
    assert math.isnan(float(events[0]["loss"]))
    snapshots = Snapshots.latest
    assert _equal(snapshots.before[5], snapshots.after[5])  # weights, EMA (and its update count), Adam state
    assert snapshots.after[5]["state_dict"]["ema._extra_state"] == {"num_updates": 4}
    assert not _equal(snapshots.before[6]["state_dict"], snapshots.after[6]["state_dict"])  # step 6 trains again
    assert _ckpt(tmp_path / "checkpoints" / "step_000006.ckpt")["global_step"] == 6


def test_rollback_restores_the_newest_checkpoint_and_lowers_the_learning_rate(tmp_path, capsys):
    _run(tmp_path, "callbacks.divergence.action=rollback", "callbacks.divergence.lr_factor=0.25")
    snapshots = Snapshots.latest
    step3 = _ckpt(tmp_path / "checkpoints" / "step_000003.ckpt")
    (event,) = _events(tmp_path)
    assert (event["step"], event["action"], event["checkpoint_step"]) == (5, "rollback", 3)
    assert "rolled back to" in capsys.readouterr().out
    after = snapshots.after[5]
    assert _equal(after["state_dict"], step3["state_dict"])  # weights and EMA of step 3
    restored, saved = after["optimizer"], step3["optimizer_states"][0]
    assert _equal(restored["state"], saved["state"])  # Adam's moments and step counts of step 3
    assert restored["param_groups"][0]["lr"] == pytest.approx(0.25 * 1e-3) == event["lr"]
    last = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 8 and last["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(2.5e-4)
    assert last["callbacks"]["DivergenceGuard"]["events"] == 1  # a resumed run knows the event happened


def test_rollback_without_a_checkpoint_stops(tmp_path):
    with pytest.raises(DivergenceError, match="step 2: non-finite loss.*no readable checkpoint"):
        _run(tmp_path, "callbacks.divergence.action=rollback", poison="[2]")


def test_a_loss_spike_beyond_the_z_score_is_caught(tmp_path):
    # objective=x0: the target is the (scaled) image, so the loss of a scaled batch is a ~1e6 spike
    _run(tmp_path, "objective=x0", "callbacks.divergence.action=skip", "callbacks.divergence.z_score=4",
         "callbacks.divergence.window=4", poison="[7]", kind="scale")
    (event,) = _events(tmp_path)
    assert event["step"] == 7 and event["event"] == "loss spike" and event["z"] > 100 and event["loss"] > 1e3


def test_bad_guard_settings_are_refused_before_training(tmp_path):
    allowed = r"use one of \('stop', 'skip', 'rollback'\)"
    with pytest.raises(ConfigError, match=rf"callbacks.divergence.action='undo' is not an option: {allowed}"):
        train(compose("train", [*TINY_TRAIN, "callbacks.divergence.action=undo", f"output_dir={tmp_path}"]))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_ranks_agree_on_a_spike_only_one_rank_sees(tmp_path):
    """2 processes: only rank 1's batch spikes; both skip (the loss is averaged over ranks first) and stay identical."""
    run_dir = tmp_path / "ddp"
    run_script(
        "train.py", *TINY_TRAIN, "objective=x0", "trainer=ddp_cpu", "trainer.max_steps=8",
        "trainer.val_check_interval=8",
        "callbacks.divergence.action=skip", "callbacks.divergence.z_score=4", "callbacks.divergence.window=4",
        "+callbacks.poison._target_=tests.test_divergence.Poison", "+callbacks.poison.steps=[7]",
        "+callbacks.poison.kind=scale", "+callbacks.poison.rank=1", f"hydra.run.dir={run_dir}",
    )
    (event,) = _events(run_dir)
    assert event["step"] == 7 and event["event"] == "loss spike" and event["action"] == "skip"
    consistency = json.loads((run_dir / "ddp_consistency.json").read_text())
    assert consistency["global_step"] == 8 and len({r["weights_sha256"] for r in consistency["ranks"]}) == 1
