"""Crash-safe files: each is written whole to a temporary file, then renamed into place."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on ``.<name>.tmp-<pid>`` beside ``path``, flush it to disk and rename it to ``path``.

    Readers see the old file or the new one, never a part: a process killed mid-write leaves
    the previous file whole and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, except that a kill during a save never leaves a truncated file.

    Lightning's own writer serialises to memory and then writes the target file in place, so a job
    killed mid-write (preemption, OOM, a time limit) leaves a truncated ``last.ckpt``. Here the bytes
    go through :func:`atomic_write`. Remote (``scheme://``) paths keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f))
