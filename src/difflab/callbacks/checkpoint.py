"""Lightning's ModelCheckpoint, with last.ckpt also written at the end of a fit that did not end on a save step."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` holds the final state of a completed fit.

    Lightning 2.6 writes ``last.ckpt`` at the end of a fit only if it was never written, so a run of
    1000 steps saving every 300 ends with the step-900 state in ``last.ckpt``: sampling it misses the
    last 100 steps, and the same command "resumes" and repeats them. Here a fit that ran to its end
    (not one stopped by a callback, such as a preemption that saved already) also saves ``last.ckpt``.
    """

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_train_end(trainer, module)
        if self.save_last and not trainer.should_stop and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
