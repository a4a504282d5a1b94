"""Launching a run on 1..N processes: the DDP launch path per situation, the global batch, rank checks.

Measured on CPU with gloo (tests/test_scaling.py runs each path; docs/scaling.md): Lightning's plain ``ddp`` re-launches the script, which under
Hydra ``-m`` re-runs the whole sweep and under submitit rejects its own arguments; ``ddp_spawn``
works under a single run, ``-m`` and submitit. So a DDP run started by ``python train.py`` spawns
its ranks, and a run whose ranks a scheduler already started (SLURM tasks, torchrun) uses ``ddp``:

| launched by                                   | strategy     | cluster environment            |
|-----------------------------------------------|--------------|--------------------------------|
| ``python train.py [-m] trainer=ddp``          | ``ddp_spawn``| local                          |
| SLURM / submitit, one task per device         | ``ddp``      | SLURM; devices and nodes from the allocation; Lightning's own requeue off (:class:`~difflab.callbacks.Preemption` does it) |
| SLURM with a single task for several devices  | ``ddp_spawn``| local                          |
| ``torchrun --nproc_per_node=N train.py``      | ``ddp``      | torchelastic                   |
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment, TorchElasticEnvironment

from difflab.errors import ConfigError

DDP_STRATEGIES = ("ddp", "ddp_spawn")


def launch_settings(strategy: Any) -> dict[str, Any]:
    """The Trainer's ``strategy`` (and ``plugins``) for a requested DDP strategy in this process's situation."""
    if strategy not in DDP_STRATEGIES:
        return {}
    if TorchElasticEnvironment.detect():
        return {"strategy": "ddp"}
    if SLURMEnvironment.detect():
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            # the allocation decides the shape: one task per device on each of its nodes
            shape = {
                "devices": int(re.match(r"\d+", os.environ.get("SLURM_NTASKS_PER_NODE", "1")).group()),
                "num_nodes": int(os.environ.get("SLURM_NNODES", os.environ.get("SLURM_JOB_NUM_NODES", "1"))),
            }
            return {"strategy": "ddp", "plugins": [SLURMEnvironment(auto_requeue=False)], **shape}
        return {"strategy": "ddp_spawn", "plugins": [LightningEnvironment()]}
    return {"strategy": "ddp_spawn"}


def device_batch_size(global_batch_size: int, world_size: int, accumulate_grad_batches: int = 1) -> int:
    """B_device = B_global / (world_size * accumulate_grad_batches); refuses a batch that does not divide."""
    split = world_size * accumulate_grad_batches
    if global_batch_size % split:
        raise ConfigError(
            f"dataset.batch_size={global_batch_size} (the global batch per optimizer step) is not divisible by "
            f"world_size={world_size} x trainer.accumulate_grad_batches={accumulate_grad_batches} = {split}: "
            f"use a multiple of {split}"
        )
    return global_batch_size // split


def tensor_digest(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> str:
    """sha256 of the tensors' bytes, in order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RankConsistency(L.Callback):
    """At the end of a multi-process fit, check that every rank holds bit-identical weights, EMA weights and noise.

    Writes ``<dirpath>/ddp_consistency.json`` (each rank's digests) and fails the run if they differ:
    diverged EMA copies (diffusers #1895) would otherwise go unnoticed until sampling.
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.world_size == 1:
            return
        mine = {
            "weights_sha256": tensor_digest(module.net.parameters()),
            "ema_sha256": tensor_digest(module.ema.module.parameters()),
            "noise_sha256": tensor_digest(module.noise.state_dict().values()),  # fitted on rank 0, broadcast
        }
        ranks: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, mine)
        if trainer.is_global_zero:
            report = {"world_size": trainer.world_size, "global_step": trainer.global_step, "ranks": ranks}
            self.dirpath.mkdir(parents=True, exist_ok=True)
            (self.dirpath / "ddp_consistency.json").write_text(json.dumps(report, indent=2))
        for key in mine:
            if len({r[key] for r in ranks}) != 1:
                raise RuntimeError(f"{key} differs between ranks at step {trainer.global_step}: {[r[key] for r in ranks]}")


@contextmanager
def forward_signals_to_children(signals: list[signal.Signals]) -> Iterator[None]:
    """While a ``ddp_spawn`` fit runs, pass ``signals`` the launcher process gets on to the spawned ranks."""

    def forward(signum: int, _frame: Any) -> None:
        for child in multiprocessing.active_children():
            if child.pid is not None:
                os.kill(child.pid, signum)

    previous = {s: signal.signal(s, forward) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
