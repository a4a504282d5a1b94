"""Crash-safe checkpoint files: written whole through a temporary file and a rename, read without running code."""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from difflab.errors import ConfigError

T = TypeVar("T")


_TEMPORARY = re.compile(r"\..+\.tmp-(\d+)")
"""The name :func:`atomic_write` gives its temporary file: ``.<name>.tmp-<pid of the writer>``."""
MARGIN_BYTES = 16 * 2**20
"""Free space asked for beyond a checkpoint's estimated size: the pickled structure, zip headers, file system slack."""


class DiskFullError(OSError):
    """A file (a checkpoint) does not fit on its disk; ``errno`` is ENOSPC, the message names the directory and MB."""

    def __init__(self, directory: str | os.PathLike, name: str, need: int, free: int) -> None:
        self.directory, self.name, self.need, self.free = Path(directory), name, need, free
        super().__init__(
            f"no space left on {self.directory}: need about {_mb(need)} MB for {name}, {_mb(free)} MB free; "
            "free space there or point the run's output dir at a disk with room"
        )
        self.errno = errno.ENOSPC

    def __reduce__(self) -> tuple[type, tuple[Path, str, int, int]]:
        return type(self), (self.directory, self.name, self.need, self.free)


def _mb(num_bytes: int) -> int:
    return round(num_bytes / 2**20)


def checkpoint_nbytes(checkpoint: Any) -> int:
    """The bytes of the tensor storages in ``checkpoint`` (nested dicts, lists, tuples), each storage counted once.

    torch.save writes whole storages, so this is about a checkpoint file's size, less its pickled structure.
    """
    storages: dict[int, int] = {}

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    visit(checkpoint)
    return sum(storages.values())


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], size_hint: int | None = None) -> Path:
    """Call ``write(f)`` on ``.<name>.tmp-<pid>`` beside ``path``, flush it to disk and rename it to ``path``.

    Readers see the old file or the new one, never a part: a process killed mid-write leaves the previous file
    whole (and, killed with SIGKILL, its temporary file: :func:`remove_orphan_temporaries`). Given a
    ``size_hint``, the directory must first have room for about that many bytes, or the size of the file
    ``path`` replaces if larger, plus :data:`MARGIN_BYTES`. Either check failing, or the disk filling during
    the write, raises :class:`DiskFullError`; the previous file is then unchanged and no temporary file is left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    need = max(size_hint or 0, path.stat().st_size if path.is_file() else 0) + MARGIN_BYTES
    if size_hint is not None:
        free = shutil.disk_usage(path.parent).free
        if free < need:
            raise DiskFullError(path.parent, path.name, need, free)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if _disk_full(err, path.parent):
            written = tmp.stat().st_size if tmp.exists() else 0
            free = shutil.disk_usage(path.parent).free + written  # the room the file had
            raise DiskFullError(path.parent, path.name, max(need, written + MARGIN_BYTES), free) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _disk_full(err: BaseException, directory: Path) -> bool:
    """Whether a write failed for want of space: ``err`` or an exception it came from is ENOSPC or EDQUOT, or
    it is torch's writer failing ("[enforce fail at inline_container.cc...]") with under :data:`MARGIN_BYTES` free.
    """
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    return (
        isinstance(err, RuntimeError) and "inline_container" in str(err)
        and shutil.disk_usage(directory).free < MARGIN_BYTES
    )


def remove_orphan_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.tmp-<pid>`` files of :func:`atomic_write` in ``directory`` whose writer is dead.

    A save killed with SIGKILL leaves its temporary file; the file of a pid that is a live process on this
    host is kept (another rank may be writing it). Call it at a run's start, before any save: a pid is only
    looked up on this host. Returns the removed paths, sorted; a missing directory removes nothing.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        found = _TEMPORARY.fullmatch(path.name)
        if found and path.is_file() and not _alive(int(found.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process on this host (signal 0 probes it without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, except that a kill during a save never leaves a truncated file.

    Lightning's own writer serialises to memory and then writes the target file in place, so a job
    killed mid-write (preemption, OOM, a time limit) leaves a truncated ``last.ckpt``. Here the bytes
    go through :func:`atomic_write`, which first checks for free space (about the checkpoint's tensor bytes)
    and raises :class:`DiskFullError` rather than torch's opaque write error. Remote (``scheme://``) paths keep
    Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f), size_hint=checkpoint_nbytes(checkpoint))


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


PERIODIC = re.compile(r"step_(\d+)\.ckpt")
"""The name of a periodic checkpoint (``step_000300.ckpt``: the step it holds)."""


def periodic_checkpoints(directory: str | os.PathLike) -> dict[int, Path]:
    """{global step: path} of the periodic ``step_*.ckpt`` checkpoints in ``directory``, the step read from the name."""
    found = (PERIODIC.fullmatch(p.name) for p in Path(directory).glob("step_*.ckpt"))
    return {int(m.group(1)): Path(directory) / m.group(0) for m in found if m}
