"""Helpers every entry point shares: how paths are shown, devices, counts and output dirs checked, sweep names."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from difflab.errors import ConfigError
from difflab.tasks.checks import unwritable


def show(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.absolute().relative_to(Path.cwd().absolute()))
    except ValueError:
        return str(path)


def pick_device(name: str) -> torch.device:
    """``device=``: auto (cuda if available, else cpu), cpu, or cuda[:N] of a CUDA device this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name} is not a device difflab runs on: allowed are auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}, but no CUDA device is available on this machine: allowed are auto, cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(
            f"device={name}, but this machine has {count} CUDA device(s): allowed are auto, cpu, cuda, "
            f"cuda:0 .. cuda:{count - 1}"
        )
    return device


def check_counts(cfg: DictConfig, *keys: str) -> None:
    """Refuse a ``cfg`` count (num_samples, batch_size, ...) that is not a positive integer."""
    for key in keys:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {value}")


def checked_out_dir(cfg: DictConfig, names: tuple[str, ...]) -> Path:
    """``cfg.out_dir`` (default: the run dir); refused if it is a file, cannot be created or written, or holds one
    of ``names`` and not overwrite."""
    out_dir = Path(cfg.out_dir or cfg.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir={out_dir} is an existing file, not a directory: give a new or existing directory")
    reason = unwritable(out_dir)
    if reason:
        raise ConfigError(f"out_dir={out_dir} cannot be written ({reason}): give a directory you can write to")
    for name in names:
        if (out_dir / name).exists() and not cfg.overwrite:
            raise ConfigError(f"{out_dir / name} already exists: pick another out_dir, or set overwrite=true")
    return out_dir


def sweep_name() -> str | None:
    """The name of the Hydra sweep (-m) this job belongs to; None for a single run."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def group_choice(group: str, fallback: str) -> str:
    """The option of config group ``group`` this Hydra job composed (``sampler=ddim``: ddim); else ``fallback``."""
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get(group) or fallback)
    return fallback
