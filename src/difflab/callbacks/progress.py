"""One progress report over the whole run: step / max_steps, ETA, images/s and the training loss."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm


REFRESH_SECONDS = 0.5
"""How often the bar's images/s and loss are recomputed."""


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    return str(timedelta(seconds=round(seconds)))


class RunProgress(ProgressBar):
    """Lightning's progress bar replaced by one over the whole run (Lightning's counts batches per epoch).

    On a terminal, a tqdm bar over the optimizer steps (``step / max_steps``, elapsed and ETA) with images/s and
    the training loss beside it; otherwise (a log file, SLURM) one plain line every ``every_n_steps`` steps and at
    the end, and one after each validation. images/s averages over the run so far (data, callbacks, validation
    and all; every rank's images), and the ETA extrapolates that rate. Rank 0 reports; other ranks stay silent.
    """

    def __init__(self, every_n_steps: int = 50, tty: bool | None = None, file: TextIO | None = None) -> None:
        super().__init__()
        if every_n_steps <= 0:
            raise ValueError(f"callbacks.progress.every_n_steps must be a positive integer, got {every_n_steps}")
        self.every_n_steps, self.tty, self.file = every_n_steps, tty, file
        self._enabled = True
        self.bar: tqdm | None = None
        self._start_step, self._last_step, self._images = 0, 0, 0
        self._started = self._shown = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def _out(self) -> TextIO:
        return self.file or sys.stdout

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start_step = self._last_step = trainer.global_step  # a resumed run continues from its step
        self._images, self._started = 0, time.perf_counter()
        tty = self._out().isatty() if self.tty is None else self.tty
        if self.is_enabled and tty:
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="training", unit="step",
                            file=self._out(), dynamic_ncols=True, leave=True)

    def status(self, trainer: L.Trainer) -> dict[str, Any]:
        """step, max_steps, images/s, loss, elapsed and ETA (seconds) of the run so far."""
        step, elapsed = trainer.global_step, time.perf_counter() - self._started
        done = step - self._start_step
        loss = trainer.progress_bar_metrics.get("train/loss")
        return {
            "step": step, "max_steps": trainer.max_steps, "images_per_sec": self._images / elapsed if elapsed else 0.0,
            "loss": None if loss is None else float(loss), "elapsed": elapsed,
            "eta": elapsed / done * (trainer.max_steps - step) if done else None,
        }

    def line(self, trainer: L.Trainer) -> str:
        """The plain report: ``step 300/1200 (25%)  loss 0.0312  183 img/s  elapsed 0:01:44  ETA 0:05:12``."""
        s = self.status(trainer)
        loss = "" if s["loss"] is None else f"  loss {s['loss']:.4g}"
        eta = "?" if s["eta"] is None else clock(s["eta"])
        return (f"step {s['step']}/{s['max_steps']} ({100 * s['step'] / s['max_steps']:.0f}%){loss}  "
                f"{s['images_per_sec']:.0f} img/s  elapsed {clock(s['elapsed'])}  ETA {eta}")

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._images += len(batch[0]) * trainer.world_size
        step = trainer.global_step
        if step == self._last_step or not self.is_enabled:  # an accumulated micro-batch, or a silent rank
            return
        self._last_step = step
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            now = time.perf_counter()
            if now - self._shown >= REFRESH_SECONDS or step == trainer.max_steps:  # reading the loss syncs a GPU
                self._shown = now
                s = self.status(trainer)
                self.bar.set_postfix_str(
                    f"{s['images_per_sec']:.0f} img/s" + ("" if s["loss"] is None else f", loss {s['loss']:.4g}"),
                )
        elif step % self.every_n_steps == 0 or step == trainer.max_steps:
            print(self.line(trainer), file=self._out(), flush=True)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.is_enabled or trainer.sanity_checking:
            return
        shown = {k: float(v) for k, v in trainer.progress_bar_metrics.items() if k.startswith("val/")}
        if shown:
            text = f"step {trainer.global_step}: " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items()))
            if self.bar is not None:
                self.bar.write(text, file=self._out())
            else:
                print(text, file=self._out(), flush=True)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.print``: above the bar on a terminal."""
        text = " ".join(map(str, args))
        if self.bar is not None:
            self.bar.write(text, file=self._out())
        else:
            print(text, file=self._out(), flush=True)
