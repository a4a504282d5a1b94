"""A run interrupted at step k and resumed ends bit-identical to the uninterrupted run: weights, EMA, optimizer, LR.

The runs are short (14 steps of the tiny model) on an epoch of 6 batches (200 training images at
batch 32), so interruptions fall mid-epoch, on an epoch's last batch and after an epoch boundary;
horizontal flips are on and a "user" callback perturbs each batch with draws from the global torch,
numpy and python RNGs, so every random stream of a step is exercised.
"""

from __future__ import annotations

import csv
import os
import random
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from difflab.tasks import train
from tests.conftest import TINY_TRAIN, compose

STEPS = 14
RESUMABLE = [
    *TINY_TRAIN,
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=7",
    "dataset.val_fraction=0.8887",  # 200 training images: 6 batches of 32 per epoch
    "dataset.hflip=true",
    "lr_scheduler.warmup_steps=10",  # an LR scheduler whose state matters
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.sample_grid.every_n_steps=1000",
    "+callbacks.user_noise._target_=tests.test_resume.GlobalRandomNoise",
]


class GlobalRandomNoise(L.Callback):
    """User code that draws from the global RNGs each step: adds a little torch + numpy + python noise to the batch."""

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        x = batch[0]
        x.add_(0.01 * torch.rand(x.shape) + 0.01 * float(np.random.rand()) + 0.01 * random.random())


class SignalAt(L.Callback):
    """Sends this process ``signum`` when training reaches ``step``: the scheduler's preemption warning."""

    def __init__(self, step: int, signum: str = "SIGUSR2") -> None:
        self.step, self.signum = step, signal.Signals[signum]

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step - 1:  # during the step that completes `step`
            os.kill(os.getpid(), self.signum)


def _state(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


LOGGED = ("train/loss", "train/lr", "train/ema_decay", "val/loss", "val/loss_ema")


def _logged(run_dir: Path) -> dict[tuple[int, str], str]:
    """{(step, metric): value as written} of logs/metrics.csv, for the metrics that do not depend on timing."""
    with open(run_dir / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {(int(row["step"]), key): row[key] for row in rows for key in LOGGED if row.get(key)}
    assert len(logged) == sum(1 for row in rows for key in LOGGED if row.get(key)), "a (step, metric) logged twice"
    return logged


def assert_identical(expected: Any, actual: Any, path: str = "") -> None:
    """Nested dicts / lists of tensors and plain values are equal, tensors bit for bit (same dtype, torch.equal)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, path
        assert torch.equal(expected, actual), f"{path} differs: max |diff| {(expected - actual).abs().max()}"
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), f"{path}: keys {expected.keys() ^ actual.keys()}"
        for key in expected:
            assert_identical(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), path
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_identical(e, a, f"{path}[{i}]")
    else:
        assert expected == actual, f"{path}: {expected!r} != {actual!r}"


def assert_same_training_state(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Weights + EMA (+ EMA update count), optimizer, LR scheduler, step, epoch, data position, guard's loss window."""
    assert expected["global_step"] == actual["global_step"] == STEPS
    assert any(k.startswith("ema.module.") for k in expected["state_dict"])
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "epoch"):
        assert_identical(expected[key], actual[key], key)
    assert_identical(expected["loops"]["fit_loop"]["state_dict"], actual["loops"]["fit_loop"]["state_dict"], "data")
    assert_identical(expected["callbacks"]["DivergenceGuard"], actual["callbacks"]["DivergenceGuard"], "losses")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "full"
    train(compose("train", [*RESUMABLE, f"output_dir={run_dir}"]))
    return run_dir


@pytest.mark.parametrize("k", [3, 6], ids=["mid-epoch", "epoch-end"])
def test_resume_from_ckpt_path_equals_the_uninterrupted_run(uninterrupted, tmp_path, k):
    """A job killed after step k: its step_k checkpoint, resumed with ckpt_path= in a new run dir, reaches step N."""
    ckpt = uninterrupted / "checkpoints" / f"step_{k:06d}.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == k
    train(compose("train", [*RESUMABLE, f"output_dir={tmp_path}", f"ckpt_path={ckpt}"]))
    assert_same_training_state(_state(uninterrupted), _state(tmp_path))


def test_preempted_and_requeued_run_equals_the_uninterrupted_run(uninterrupted, tmp_path, capsys, monkeypatch):
    """SIGUSR2 at step 8 (mid second epoch): save + stop; the same command (resume=auto) continues to step N."""
    preempted = [*RESUMABLE, f"output_dir={tmp_path}"]
    signal_at_8 = ["+callbacks.signal._target_=tests.test_resume.SignalAt", "+callbacks.signal.step=8"]
    train(compose("train", [*preempted, *signal_at_8]))
    assert "preempted by SIGUSR2 at step 8" in capsys.readouterr().out
    assert _state(tmp_path)["global_step"] == 8
    loads = []
    torch_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or torch_load(*a, **k))
    train(compose("train", preempted))
    monkeypatch.undo()
    assert len(loads) >= 2 and all(w is True for w in loads)  # difflab's check and Lightning's restore, weights_only
    assert f"resuming:    {tmp_path / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    assert_same_training_state(_state(uninterrupted), _state(tmp_path))
    # the log of both legs holds the uninterrupted run's log: every loss, lr and validation value, as written,
    # plus the validation Lightning runs when a callback stops a fit (after step 8, logged at row 7)
    full, legs = _logged(uninterrupted), _logged(tmp_path)
    assert len(full) > 3 * STEPS and {key: legs.get(key) for key in full} == full
    assert set(legs) - set(full) == {(7, "val/loss"), (7, "val/loss_ema")}


def test_lazy_path_with_workers_preempted_and_resumed_equals_the_uninterrupted_in_memory_run(uninterrupted, tmp_path):
    """Images decoded per batch in 2 persistent workers, SIGUSR2 at step 8 and requeued: the in-memory run's state."""
    lazy = [*RESUMABLE, f"output_dir={tmp_path}", "dataset.in_memory=false", "dataset.num_workers=2"]
    train(compose("train", [*lazy, "+callbacks.signal._target_=tests.test_resume.SignalAt", "+callbacks.signal.step=8"]))
    assert _state(tmp_path)["global_step"] == 8
    train(compose("train", lazy))
    assert_same_training_state(_state(uninterrupted), _state(tmp_path))


def test_data_order_and_flips_depend_on_seed_and_epoch_only():
    """ShuffledEpochs: epoch e's items are a function of (seed, e); ranks split each global batch; resume skips."""
    from difflab.data import ShuffledEpochs

    data = list(range(20))

    def epoch(e: int, seed: int = 0, **ranks: int) -> list[tuple[int, int]]:
        sampler = ShuffledEpochs(data, seed, **ranks)
        sampler.set_epoch(e)
        return list(sampler)

    first = epoch(0)
    assert sorted(i for i, _ in first) == data and first == epoch(0)
    assert first != epoch(1) and first != epoch(0, seed=1)
    flips = [s & 1 for _, s in first]
    assert 4 <= sum(flips) <= 16  # a fair coin per item
    halves = [epoch(0, num_replicas=2, rank=r) for r in (0, 1)]
    assert [x for pair in zip(*halves) for x in pair] == first  # rank r takes positions r, r + 2, ...
    sampler = ShuffledEpochs(data, 0)
    sampler.skip = 7
    assert list(sampler) == first[7:] and list(sampler) == first  # the skip applies to one pass


def test_resume_of_a_latent_model_with_fitted_noise_equals_the_uninterrupted_run(stage1, tmp_path):
    """The latent scale and the noise statistics are decided at the first fit's start: a resumed fit keeps them."""
    shaped = [*RESUMABLE, "latent=vae", f"latent.path={stage1[0] / 'vae'}", "noise=spectral"]
    train(compose("train", [*shaped, f"output_dir={tmp_path / 'full'}"]))
    ckpt = tmp_path / "full" / "checkpoints" / "step_000006.ckpt"
    train(compose("train", [*shaped, f"output_dir={tmp_path / 'resumed'}", f"ckpt_path={ckpt}"]))
    full, resumed = _state(tmp_path / "full"), _state(tmp_path / "resumed")
    assert {"latent.scaling_factor", "noise.fit_count"} <= full["state_dict"].keys()
    assert not any(key.startswith("latent.vae.") for key in full["state_dict"])  # the frozen VAE is an input
    assert_same_training_state(full, resumed)


def test_preempted_text_run_equals_the_uninterrupted_run(tmp_path):
    """conditioning=text (scratch encoder, caption dropout), SIGUSR2 at step 6 and requeued: the uninterrupted run's
    UNet, text encoder, EMA and optimizer, bit for bit, and the same tokenizer in the checkpoint and the run dir."""
    text = [*RESUMABLE, "conditioning=text"]
    train(compose("train", [*text, f"output_dir={tmp_path / 'full'}"]))
    preempted = [*text, f"output_dir={tmp_path / 'resumed'}"]
    signal_at_6 = ["+callbacks.signal._target_=tests.test_resume.SignalAt", "+callbacks.signal.step=6"]
    train(compose("train", [*preempted, *signal_at_6]))
    assert _state(tmp_path / "resumed")["global_step"] == 6
    train(compose("train", preempted))
    full, resumed = _state(tmp_path / "full"), _state(tmp_path / "resumed")
    assert any(k.startswith("net.text_encoder.") for k in full["state_dict"])
    assert any(k.startswith("ema.module.text_encoder.") for k in full["state_dict"])
    assert_same_training_state(full, resumed)
    tokenizer = full["hyper_parameters"]["run_config"]["text_encoder"]["tokenizer"]
    assert tokenizer and resumed["hyper_parameters"]["run_config"]["text_encoder"]["tokenizer"] == tokenizer
    files = sorted(p.name for p in (tmp_path / "full" / "tokenizer").iterdir())
    assert files and files == sorted(p.name for p in (tmp_path / "resumed" / "tokenizer").iterdir())
    for name in files:
        saved = [(tmp_path / leg / "tokenizer" / name).read_bytes() for leg in ("full", "resumed")]
        assert saved[0] == saved[1], name
