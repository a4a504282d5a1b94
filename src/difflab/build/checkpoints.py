"""Checkpoint -> objects: find a checkpoint, read it without running code, rebuild its model from the run config
that travels inside it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from difflab.build.config import upgrade_run_config
from difflab.build.objects import build_classifier, build_module
from difflab.build.trust import check_stored_config
from difflab.checkpointing import read_checkpoint_file
from difflab.classifier import ClassifierModule
from difflab.errors import ConfigError
from difflab.module import DiffusionModule


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a training run dir's ``checkpoints/last.ckpt``."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "checkpoints" / "last.ckpt"
    if not p.is_file():
        raise ConfigError(
            f"checkpoint not found: {p} (give ckpt= a .ckpt file, or a training run dir holding checkpoints/last.ckpt)"
        )
    return p


def read_checkpoint(path: str | os.PathLike, task_name: str) -> tuple[dict[str, Any], DictConfig]:
    """A checkpoint's contents and run config, loaded with ``weights_only=True`` (no arbitrary pickles); the config
    is checked against the allowlist of buildable targets (:mod:`difflab.build.trust`: it never runs code) and
    upgraded to today's config groups."""
    p = resolve_checkpoint(path)
    ckpt = read_checkpoint_file(p)
    hyper_parameters = ckpt.get("hyper_parameters")
    run_config = hyper_parameters.get("run_config") if isinstance(hyper_parameters, dict) else None
    if not isinstance(run_config, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{p} is not a difflab checkpoint (it has no run config or state_dict)")
    if run_config.get("task_name") != task_name:
        raise ConfigError(f"{p} is a checkpoint of a '{run_config.get('task_name')}' run, expected a '{task_name}' run")
    return ckpt, upgrade_run_config(OmegaConf.create(check_stored_config(run_config, str(p))))


def module_from_checkpoint(ckpt: dict[str, Any], run_config: DictConfig) -> DiffusionModule:
    """The DiffusionModule of a checkpoint read by :func:`read_checkpoint`, with its weights."""
    module = build_module(run_config)
    module.load_state_dict(ckpt["state_dict"])
    return module


def load_checkpoint(path: str | os.PathLike, vae_path: str | None = None) -> DiffusionModule:
    """Rebuild a DiffusionModule from a train.py checkpoint alone (its run config travels inside it).

    A latent-space model loads its VAE from the path it was trained with, or ``vae_path`` if it moved
    (the VAE's fingerprint must match either way).
    """
    ckpt, run_config = read_checkpoint(path, "train")
    if vae_path is not None:
        if OmegaConf.select(run_config, "latent._target_") is None:
            raise ConfigError(f"vae_path={vae_path} given, but {path} is a pixel-space model (trained with latent=none)")
        run_config.latent.path = str(vae_path)
    return module_from_checkpoint(ckpt, run_config)


def load_classifier(path: str | os.PathLike) -> ClassifierModule:
    """Rebuild a ClassifierModule from a train_classifier.py checkpoint, in eval mode."""
    ckpt, run_config = read_checkpoint(path, "classifier")
    module = build_classifier(run_config)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
