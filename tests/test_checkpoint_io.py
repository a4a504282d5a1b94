"""Checkpoint files on a full disk and after a kill -9: a clear error, the previous file whole, no temporaries."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflab.checkpointing import (
    MARGIN_BYTES,
    AtomicCheckpointIO,
    DiskFullError,
    atomic_write,
    checkpoint_nbytes,
    read_checkpoint_file,
    remove_orphan_temporaries,
)

MB = 2**20


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphan_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        orphan = tmp_path / f".last.ckpt.tmp-{dead}"
        orphan_step = tmp_path / f".step_000006.ckpt.tmp-{dead}"
        writing = tmp_path / f".last.ckpt.tmp-{live.pid}"
        mine = tmp_path / f".step_000003.ckpt.tmp-{os.getpid()}"
        keep = [tmp_path / "last.ckpt", tmp_path / "notes.tmp-1", tmp_path / ".last.ckpt.tmp-x1"]
        for path in [orphan, orphan_step, writing, mine, *keep]:
            path.write_bytes(b"x")
        assert remove_orphan_temporaries(tmp_path) == sorted([orphan, orphan_step])
        assert sorted(tmp_path.iterdir()) == sorted([writing, mine, *keep])
        assert remove_orphan_temporaries(tmp_path) == []
    finally:
        live.kill()
        live.wait()
    assert remove_orphan_temporaries(tmp_path) == [writing]  # its writer is now dead too
    assert remove_orphan_temporaries(tmp_path / "missing") == []


def test_a_kill_9_mid_save_leaves_an_orphan_that_is_then_removed(tmp_path):
    """A real writer killed with SIGKILL inside atomic_write: last.ckpt whole, its temporary removed afterwards."""
    last = tmp_path / "last.ckpt"
    atomic_write(last, lambda f: torch.save({"step": 1}, f))
    script = (
        "import sys, time, torch\n"
        "from difflab.checkpointing import atomic_write\n"
        "def write(f):\n"
        "    f.write(b'partial'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
        f"atomic_write({str(last)!r}, write)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    proc.kill()
    proc.wait()
    orphan = tmp_path / f".last.ckpt.tmp-{proc.pid}"
    assert orphan.read_bytes() == b"partial"
    assert remove_orphan_temporaries(tmp_path) == [orphan]
    assert sorted(tmp_path.iterdir()) == [last] and read_checkpoint_file(last) == {"step": 1}


def test_checkpoint_nbytes_counts_each_storage_once():
    weight = torch.zeros(1000, 250)  # 1_000_000 bytes
    ckpt = {"state_dict": {"w": weight, "w_t": weight.t(), "b": torch.zeros(10, dtype=torch.float64)},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(1000, 250)}}}], "epoch": 3}
    assert checkpoint_nbytes(ckpt) == 1_000_000 + 80 + 1_000_000


def _save(path: Path, checkpoint: dict) -> None:
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)


def test_a_save_without_room_is_refused_before_writing(tmp_path, monkeypatch):
    """disk_usage reports 20 MB free; the 40 MB checkpoint needs about 40 + 16 MB: refused, nothing touched."""
    last = tmp_path / "last.ckpt"
    _save(last, {"step": 1, "w": torch.zeros(10)})
    before = last.read_bytes()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=20 * MB))
    big = {"step": 2, "w": torch.zeros(10 * MB)}  # 40 MiB of float32
    with pytest.raises(DiskFullError) as err:
        _save(last, big)
    assert str(err.value) == (
        f"no space left on {tmp_path}: need about 56 MB for last.ckpt, 20 MB free; "
        "free space there or point the run's output dir at a disk with room"
    )
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert (err.value.need, err.value.free) == (40 * MB + MARGIN_BYTES, 20 * MB)
    assert last.read_bytes() == before and sorted(tmp_path.iterdir()) == [last]
    again = pickle.loads(pickle.dumps(err.value))  # crosses process boundaries (DDP) whole
    assert str(again) == str(err.value) and again.errno == errno.ENOSPC


def test_the_previous_files_size_is_needed_when_larger(tmp_path, monkeypatch):
    """Replacing a 4 MiB last.ckpt with a tiny one still needs 4 + 16 MB: both are on disk until the rename."""
    last = tmp_path / "last.ckpt"
    _save(last, {"w": torch.zeros(MB)})
    size = last.stat().st_size
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size + MARGIN_BYTES - 1))
    with pytest.raises(DiskFullError, match=r"need about 20 MB for last\.ckpt, 20 MB free"):
        _save(last, {"w": torch.zeros(1)})
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size + MARGIN_BYTES))
    _save(last, {"w": torch.zeros(1)})
    assert read_checkpoint_file(last)["w"].shape == (1,)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_enospc_during_the_write_is_the_same_error(tmp_path):
    """The disk fills mid-write: torch.save into /dev/full raises the real ENOSPC (inside torch's RuntimeError
    "[enforce fail at inline_container.cc...]"); atomic_write reports it as DiskFullError and removes its temp."""
    last = tmp_path / "last.ckpt"
    _save(last, {"step": 1})
    before = last.read_bytes()

    def write_to_a_full_disk(f) -> None:
        f.write(b"started")
        with open("/dev/full", "wb") as full:
            torch.save({"w": torch.zeros(MB)}, full)

    with pytest.raises(DiskFullError, match=rf"^no space left on {tmp_path}: need about \d+ MB for last\.ckpt") as err:
        atomic_write(last, write_to_a_full_disk)
    assert isinstance(err.value.__cause__, (OSError, RuntimeError))
    assert last.read_bytes() == before and sorted(tmp_path.iterdir()) == [last]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_torchs_bare_write_error_on_a_full_disk_is_the_same_error(tmp_path, monkeypatch):
    """torch.save to a path on a full disk raises only RuntimeError("[enforce fail at inline_container.cc:...]
    unexpected pos ..."), no OSError: with the disk reporting 0 MB free it is a DiskFullError too."""
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=0))

    def write_to_a_full_disk(f) -> None:
        torch.save({"w": torch.zeros(MB)}, "/dev/full")

    with pytest.raises(DiskFullError, match=r"need about 16 MB for last\.ckpt, 0 MB free") as err:
        atomic_write(tmp_path / "last.ckpt", write_to_a_full_disk)
    assert "inline_container" in str(err.value.__cause__)
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_pass_through(tmp_path):
    last = tmp_path / "last.ckpt"

    def fail(f) -> None:
        raise RuntimeError("not a disk problem")

    with pytest.raises(RuntimeError, match="not a disk problem"):
        atomic_write(last, fail)
    assert list(tmp_path.iterdir()) == []
