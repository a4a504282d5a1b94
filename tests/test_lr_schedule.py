"""The lr_scheduler group: warm-up then constant (the default) or cosine decay; a resumed run continues the curve."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from difflab.optim import WarmupCosine, constant, cosine
from difflab.tasks import train
from tests.conftest import TINY_TRAIN, compose


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler | None, optimizer: torch.optim.Optimizer, steps: int):
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return rates


def _sgd(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_cosine_warms_up_as_linear_lr_then_decays_by_half_a_cosine_to_the_floor():
    opt = _sgd(2.0)
    rates = _lrs(cosine(opt, total_steps=30, warmup_steps=10, min_lr_ratio=0.1), opt, 40)
    reference = _sgd(2.0)
    warmup = _lrs(constant(reference, warmup_steps=10), reference, 11)
    assert rates[:11] == pytest.approx(warmup, rel=1e-12)  # the same warm-up as the default schedule
    assert rates[10] == pytest.approx(2.0) and rates[20] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # midway
    assert rates[30] == pytest.approx(0.2) and rates[39] == pytest.approx(0.2)  # the floor from total_steps on
    assert all(a > b for a, b in zip(rates[10:30], rates[11:31]))  # strictly decreasing over the decay
    assert WarmupCosine(0, 10, 0.0)(5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_constant_without_warmup_is_no_scheduler_and_bad_settings_are_named():
    assert constant(_sgd(), warmup_steps=0) is None
    with pytest.raises(ValueError, match=r"warmup_steps must be an integer >= 0, got -1"):
        constant(_sgd(), warmup_steps=-1)
    with pytest.raises(ValueError, match=r"trainer.max_steps.*above lr_scheduler.warmup_steps=10: got total_steps=-1"):
        cosine(_sgd(), total_steps=-1, warmup_steps=10)
    with pytest.raises(ValueError, match=r"min_lr_ratio must lie in \[0, 1\], got 2"):
        cosine(_sgd(), total_steps=20, min_lr_ratio=2)


def _logged_lr(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(row["step"]): float(row["train/lr"]) for row in csv.DictReader(f) if row.get("train/lr")}


@pytest.mark.slow
def test_train_py_cosine_logs_warmup_then_cosine_and_a_preempted_run_continues_the_curve(tmp_path, capsys):
    """The issue's command (optimizer.lr=5e-4 lr_scheduler=cosine trainer.max_steps=50 model=tiny), preempted at
    step 20 and run again: the logged train/lr of both legs is the closed-form curve at every step."""
    command = [
        "optimizer.lr=5e-4", "lr_scheduler=cosine", "trainer.max_steps=50", "model=tiny",
        *[o for o in TINY_TRAIN if not o.startswith(("lr_scheduler", "trainer.max_steps", "model="))],
        "trainer.val_check_interval=25", "callbacks.model_checkpoint.every_n_train_steps=25",
        "callbacks.sample_grid.every_n_steps=1000", f"output_dir={tmp_path}",
    ]
    cfg = compose("train", command)
    assert cfg.lr_scheduler.warmup_steps == 10 and cfg.lr_scheduler.total_steps == 50  # model=tiny's warm-up
    preempt = ["+callbacks.signal._target_=tests.test_resume.SignalAt", "+callbacks.signal.step=20"]
    train(compose("train", [*command, *preempt]))
    assert "preempted by SIGUSR2 at step 20" in capsys.readouterr().out
    train(compose("train", command))
    assert "resuming:" in capsys.readouterr().out
    logged = _logged_lr(tmp_path)
    assert sorted(logged) == list(range(50))  # one value per optimizer step, from both legs
    curve = WarmupCosine(10, 50, 0.1)
    for step, lr in logged.items():
        assert lr == pytest.approx(5e-4 * curve(step), rel=1e-6), step
    assert max(logged, key=logged.get) == 10 and logged[49] < logged[30] < logged[10]  # warm-up, then decay
