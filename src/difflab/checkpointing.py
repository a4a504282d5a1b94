"""Crash-safe checkpoint files: written whole through a temporary file and a rename, read without running code."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from difflab.errors import ConfigError

T = TypeVar("T")


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


def read_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint file's contents, loaded with ``torch.load(weights_only=True)``: tensors and plain containers.

    A file that holds pickled Python objects (a class instance, a function) is refused, naming the
    object, rather than unpickled: unpickling runs code the file chooses. A truncated or corrupted
    file is a ConfigError naming it.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise ConfigError(f"checkpoint not found: {path}") from err
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise ConfigError(
                f"refusing to load {path}: it holds a pickled Python object ({found.group(1)}), "
                "and difflab loads checkpoints with torch.load(weights_only=True), which allows only tensors and "
                "plain containers, so that opening a file never runs code from it"
            ) from err
        raise ConfigError(_unreadable(path, err)) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise ConfigError(_unreadable(path, err)) from err
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path} is not a checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    return ckpt


def _unreadable(path: str | os.PathLike, err: BaseException) -> str:
    return (
        f"cannot load checkpoint {path}: it is truncated, corrupted or not a torch checkpoint ({err}); give a "
        "checkpoint written by train.py (if a save was cut short, use an earlier step_*.ckpt beside it)"
    )


def newest_readable(last: Path, read: Callable[[Path], T]) -> tuple[Path, T, ConfigError | None]:
    """(path, ``read(path)``, error): ``last``, or if ``read`` refuses it, the newest ``step_*.ckpt`` that reads.

    ``error`` is why ``last`` was passed over (None if it was read). Raises ``last``'s error when no file reads.
    """
    try:
        return last, read(last), None
    except ConfigError as err:
        for candidate in sorted(last.parent.glob("step_*.ckpt"), reverse=True):
            try:
                return candidate, read(candidate), err
            except ConfigError:
                continue
        raise
