"""Crash-safe checkpoint files: each is written whole to a temporary file, then renamed into place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, except that a kill during a save never leaves a truncated file.

    Lightning's own writer serialises to memory and then writes the target file in place, so a job
    killed mid-write (preemption, OOM, a time limit) leaves a truncated ``last.ckpt``. Here the bytes
    go to ``.<name>.tmp-<pid>`` beside the target, are flushed to disk, and ``os.replace`` swaps
    the file in: readers see the old checkpoint or the new one, never a part. Remote (``scheme://``)
    paths keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
