"""train(cfg) and sample(cfg): the bodies of train.py and sample.py, as plain functions tests call."""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from difflab.errors import ConfigError
from difflab.images import save_grid, to_uint8
from difflab.module import DiffusionModule

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig) -> DiffusionModule:
    """The DiffusionModule of a run config: ``cfg.model`` with the schedule of ``cfg.schedule``."""
    try:
        schedule = instantiate(cfg.schedule)
    except Exception as err:  # Hydra wraps the schedule's ValueError; name the config group
        raise ConfigError(f"schedule config {OmegaConf.to_container(cfg.schedule)} is invalid: {_root_cause(err)}") from err
    try:
        module = instantiate(cfg.model, schedule=schedule)
    except Exception as err:
        cause = _root_cause(err)
        if isinstance(cause, ConfigError):
            raise cause from err
        raise ConfigError(f"model config is invalid: {cause}") from err
    module.save_hyperparameters({"run_config": OmegaConf.to_container(cfg, resolve=True)})
    return module


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model of ``cfg`` on its dataset; returns the final callback metrics (val/loss, ...)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.dataset)
    datamodule.setup("fit")  # bad data fails here, before a trainer or any output exists
    module = build_module(cfg)
    data_shape = tuple(datamodule.train_set.images.shape[1:])
    if data_shape != module.net.sample_shape:
        raise ConfigError(f"the dataset's images are {data_shape} but the model expects {module.net.sample_shape}")
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist: give a .ckpt file written by an earlier run")

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        _report_training(Path(cfg.output_dir), metrics)
    return metrics


def _show(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _report_training(run_dir: Path, metrics: dict[str, float]) -> None:
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    lines = [f"run dir:     {_show(run_dir)}", f"checkpoint:  {_show(run_dir / 'checkpoints' / 'last.ckpt')}"]
    if grids:
        lines.append(f"samples:     {_show(grids[-1])}")
    lines += [f"{k}: {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("val/")]
    if _default_single_run():
        latest = _link_latest(run_dir)
        if latest:
            lines.append(f"latest:      {_show(latest)} -> {run_dir.name} (python sample.py ckpt={_show(latest)})")
    print("\n".join(lines), flush=True)


def _default_single_run() -> bool:
    """A single (not -m) Hydra run whose run dir is the config's own, not one the user picked."""
    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    picked = any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra)
    return hydra_cfg.mode == RunMode.RUN and not picked


def _link_latest(run_dir: Path) -> Path | None:
    """Point ``<parent>/latest`` at this run dir (atomically), so the newest run has a fixed name."""
    link, tmp = run_dir.parent / "latest", run_dir.parent / f".latest.{os.getpid()}"
    try:
        tmp.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError as err:
        log.warning("could not link %s to %s: %s", link, run_dir, err)
        tmp.unlink(missing_ok=True)
        return None
    return link


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


def load_checkpoint(path: str | os.PathLike) -> DiffusionModule:
    """Rebuild a DiffusionModule from a checkpoint alone (its run config travels inside it).

    Loaded with ``weights_only=True``: a checkpoint holding arbitrary pickled objects is refused.
    """
    p = resolve_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise ConfigError(f"cannot load checkpoint {p}: it is truncated, corrupted or not a torch checkpoint ({err})") from err
    run_config = ckpt.get("hyper_parameters", {}).get("run_config") if isinstance(ckpt, dict) else None
    if not run_config or "state_dict" not in ckpt:
        raise ConfigError(f"{p} is not a difflab checkpoint (it has no run config or state_dict)")
    module = build_module(OmegaConf.create(run_config))
    module.load_state_dict(ckpt["state_dict"])
    return module


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Sample ``cfg.num_samples`` images from ``cfg.ckpt``; writes samples.npz (arr_0: uint8 NHWC) and grid.png."""
    if int(cfg.num_samples) != cfg.num_samples or cfg.num_samples <= 0:
        raise ConfigError(f"num_samples must be a positive integer, got {cfg.num_samples}")
    if int(cfg.batch_size) != cfg.batch_size or cfg.batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {cfg.batch_size}")
    out_dir = Path(cfg.out_dir or cfg.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir={out_dir} is an existing file, not a directory")
    for name in ("samples.npz", "grid.png"):
        if (out_dir / name).exists() and not cfg.overwrite:
            raise ConfigError(f"{out_dir / name} already exists: pick another out_dir, or set overwrite=true")
    sampler = instantiate(cfg.sampler)
    module = load_checkpoint(cfg.ckpt).to(_device(cfg.device))
    images = to_uint8(
        module.generate(sampler, cfg.num_samples, cfg.seed, cfg.batch_size, use_ema=cfg.use_ema, progress=cfg.progress)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / "samples.npz", arr_0=images)
    grid = save_grid(images, out_dir / "grid.png", scale=cfg.grid_scale)
    print(f"samples:     {_show(out_dir / 'samples.npz')} {images.shape} {images.dtype}\ngrid:        {_show(grid)}", flush=True)
    return {"samples": out_dir / "samples.npz", "grid": grid, "images": images}
