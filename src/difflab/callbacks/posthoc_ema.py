"""Post-hoc EMA during training (EDM2): power-function EMAs of the UNet, with snapshots every N steps."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from difflab.checkpointing import atomic_write
from difflab.ema import MAX_SIGMA_REL, PowerFunctionEMA, sigma_rel_to_gamma

SNAPSHOT_DIR = "posthoc_ema"
"""The snapshots' folder in the run dir."""
_SNAPSHOT = re.compile(r"step_(\d+)_sigma_rel_([0-9.]+)\.safetensors")


@dataclass(frozen=True)
class Snapshot:
    """One stored power-function EMA: the average after optimizer step ``step`` with exponent ``gamma``."""

    path: Path
    step: int
    sigma_rel: float
    gamma: float


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"step_{step:07d}_sigma_rel_{sigma_rel:g}.safetensors"


def read_snapshots(dirpath: str | os.PathLike) -> list[Snapshot]:
    """The snapshots in ``dirpath`` (step, sigma_rel and gamma from each file's metadata), by step then sigma_rel."""
    found = []
    for path in sorted(Path(dirpath).glob("step_*.safetensors")):
        if _SNAPSHOT.fullmatch(path.name):
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
            found.append(Snapshot(path, int(meta["step"]), float(meta["sigma_rel"]), float(meta["gamma"])))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


class PostHocEMA(L.Callback):
    """Keeps one power-function EMA of the UNet's parameters per ``sigma_rels`` (EDM2; :class:`~difflab.ema.
    PowerFunctionEMA`), updated after each optimizer step (t = the global step, from 1), and writes each as a
    safetensors file ``<dirpath>/step_<t>_sigma_rel_<s>.safetensors`` every ``every_n_steps`` steps (rank 0;
    metadata step, sigma_rel, gamma; tensors named as in ``module.net``). ``python -m difflab.posthoc_ema`` fits
    the EMA of any other sigma_rel to them afterwards.

    The averages are this callback's checkpoint state, so a resumed run continues them exactly. A run resumed
    from a checkpoint without that state (trained without this callback) cannot recover them: it warns and keeps
    none. Cost (1.1M-parameter UNet, 2 CPU threads): two float32 copies of the UNet in memory and in each
    checkpoint, about 1 ms per step, and 2 x 4.4 MB of snapshots per ``every_n_steps`` (docs/training.md).
    """

    def __init__(self, dirpath: str, sigma_rels: Sequence[float] = (0.05, 0.10), every_n_steps: int = 100) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps <= 0:
            raise ValueError(f"posthoc_ema.every_n_steps must be a positive integer, got {every_n_steps!r}")
        if len(sigma_rels) == 0 or len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"posthoc_ema.sigma_rels must be distinct values, at least one, got {list(sigma_rels)}")
        for s in sigma_rels:
            if not 0.0 < s < MAX_SIGMA_REL:
                raise ValueError(f"posthoc_ema.sigma_rels must lie in (0, {MAX_SIGMA_REL:.4f}), got {s}")
        self.dirpath = Path(dirpath)
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.every_n_steps = every_n_steps
        self.ema: PowerFunctionEMA | None = None
        self.trainer: L.Trainer | None = None
        self.module: L.LightningModule | None = None
        self.names: list[str] = []
        self.step = 0
        self._loaded: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # here, not in on_fit_start: a resumed fit has restored its global step only now
        self.trainer, self.module = trainer, module
        named = list(module.net.named_parameters())
        self.names = [name for name, _ in named]
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            if state["sigma_rels"] != self.sigma_rels:
                raise ValueError(
                    f"posthoc_ema.sigma_rels={self.sigma_rels}, but the checkpoint resumed from tracked "
                    f"{state['sigma_rels']}: resume with those"
                )
            self.ema = PowerFunctionEMA([p for _, p in named], [sigma_rel_to_gamma(s) for s in self.sigma_rels])
            for average, stored in zip(self.ema.averages, state["averages"]):
                for tensor, name in zip(average, self.names):
                    tensor.copy_(stored[name])
            self.step = int(state["step"])
        elif trainer.global_step > 0:
            rank_zero_warn(
                f"post-hoc EMA: the checkpoint resumed from (step {trainer.global_step}) holds no power-function "
                "EMAs (it was trained without callbacks.posthoc_ema), so this run writes no snapshots"
            )
        else:
            self.ema = PowerFunctionEMA([p for _, p in named], [sigma_rel_to_gamma(s) for s in self.sigma_rels])

    def on_train_batch_end(self, *args: Any) -> None:
        self.catch_up()

    def catch_up(self) -> None:
        """Average in the weights of each optimizer step not yet seen, and write the snapshots due at it.

        Called at each batch's end, and before a checkpoint takes this callback's state: a callback earlier in the
        list (Preemption) may save at the end of step t before this one's hook has run for t.
        """
        t = self.trainer.global_step
        if self.ema is None or t == self.step:  # a micro-batch of gradient accumulation: no optimizer step yet
            return
        self.ema.update(list(self.module.net.parameters()), t)
        self.step = t
        if t % self.every_n_steps == 0 and self.trainer.is_global_zero:
            for sigma_rel, gamma, average in zip(self.sigma_rels, self.ema.gammas, self.ema.averages):
                self.write_snapshot(t, sigma_rel, gamma, average)

    def write_snapshot(self, step: int, sigma_rel: float, gamma: float, average: list[Any]) -> Path:
        """``<dirpath>/step_<step>_sigma_rel_<sigma_rel>.safetensors``, written atomically."""
        tensors = {name: x.detach().cpu().contiguous() for name, x in zip(self.names, average)}
        meta = {"step": str(step), "sigma_rel": repr(sigma_rel), "gamma": repr(gamma)}
        data = safetensors_bytes(tensors, metadata=meta)
        return atomic_write(self.dirpath / snapshot_name(step, sigma_rel), lambda f: f.write(data), len(data))

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        self.catch_up()
        averages = [{n: x.detach().cpu().clone() for n, x in zip(self.names, a)} for a in self.ema.averages]
        return {"step": self.step, "sigma_rels": self.sigma_rels, "averages": averages}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict or None
