"""Where a fit starts: a fresh run, its own run dir's last checkpoint (resume), or ``ckpt_path=`` of another run;
each checkpoint read without running code and checked against this command's settings before Lightning loads it."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from difflab.build import read_checkpoint
from difflab.checkpointing import atomic_write, newest_readable, periodic_checkpoints
from difflab.errors import ConfigError
from difflab.tasks.common import show

log = logging.getLogger(__name__)


EXPERIMENT = ("model", "schedule", "objective", "prediction_space", "loss", "optimizer", "lr_scheduler", "noise", "latent",
              "dataset", "conditioning", "classifier", "autoencoder", "seed")
"""The settings that make a run the experiment it is: a resumed (or skipped, finished) run must keep them."""

SPEED_KNOBS = ("model.compile", "model.channels_last")
"""Settings that change how fast a run trains, not what it learns: a resumed run may change them."""


def resume_from(cfg: DictConfig) -> str | None:
    """The checkpoint a fit starts from: ``ckpt_path``, else (``resume=auto``) the run dir's own last.ckpt.

    A run dir that already holds checkpoints is never trained over from scratch: it is resumed, or
    (``resume=never``) refused, and ``ckpt_path=`` may not start a run there. An unreadable last.ckpt
    falls back to the newest readable periodic checkpoint. Every checkpoint is read (weights_only)
    and checked before Lightning loads it: resuming needs the same experiment, ``ckpt_path=`` the
    same network and noise process.
    """
    resume = cfg.get("resume", "auto")
    if resume not in ("auto", "never"):
        raise ConfigError(f"resume={resume} is not an option: use auto (continue this run dir's last.ckpt) or never")
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    held = sorted(p.name for p in [last, *last.parent.glob("step_*.ckpt")] if p.is_file())
    if cfg.get("ckpt_path") is not None:
        return checked_ckpt_path(cfg, held)
    if not held:
        return None
    if resume == "never":
        raise ConfigError(
            f"{last.parent} already holds checkpoints and resume=never: pick another run_id, or resume=auto to continue it"
        )
    last, ckpt, saved = newest_readable_checkpoint(last, cfg.task_name)
    changed, diff = changed_settings(saved, cfg, EXPERIMENT)
    if changed:
        raise ConfigError(
            f"{last} was written by a run with other {', '.join(changed)} settings than this command ({diff}): "
            f"pick another run_id for a new experiment (nothing was changed in {last.parent.parent})"
        )
    print(f"resuming:    {show(last)}", flush=True)
    max_steps = int(cfg.trainer.get("max_steps") or -1)
    if 0 < max_steps <= int(ckpt.get("global_step", 0)):
        restore_missing_best(cfg, last, int(ckpt["global_step"]))
    return str(last)


def newest_readable_checkpoint(last: Path, task_name: str) -> tuple[Path, dict[str, Any], DictConfig]:
    """``last``, its contents and run config, or if it cannot be read, the newest periodic checkpoint beside it
    that can."""
    path, (ckpt, saved), err = newest_readable(last, lambda p: read_checkpoint(p, task_name))
    if err is not None:
        print(f"unreadable:  {show(last)} ({err}); falling back to {path.name}", flush=True)
    return path, ckpt, saved


def _logged(metrics_csv: Path, monitor: str) -> dict[int, float]:
    """{step: value} of ``monitor`` in a run's metrics.csv (a validation after step s is logged at row s - 1)."""
    if not metrics_csv.is_file():
        return {}
    with open(metrics_csv) as f:
        return {int(row["step"]) + 1: float(row[monitor]) for row in csv.DictReader(f) if row.get(monitor)}


def restore_missing_best(cfg: DictConfig, last: Path, last_step: int) -> Path | None:
    """A finished run whose ``best`` checkpoint is missing (the process was killed while writing it) gets it back:
    the kept checkpoint with the best logged value of the ``best`` callback's monitor is copied to it. Without
    this, the rerun of a finished run trains no step, validates nothing and never writes it. ``last`` (the state
    at step ``last_step``) is a candidate too. Returns the restored file, or None."""
    best = (cfg.get("callbacks") or {}).get("best")
    if not best or not best.get("monitor"):
        return None
    target = Path(best.dirpath) / f"{best.filename}.ckpt"
    if target.is_file():
        return None
    logged = _logged(Path(cfg.output_dir) / "logs" / "metrics.csv", best.monitor)
    kept = periodic_checkpoints(target.parent)
    kept.setdefault(last_step, last)
    candidates = {step: logged[step] for step in kept if step in logged}
    if not candidates:
        log.warning("%s is missing and no kept checkpoint has a logged %s: it cannot be restored", target, best.monitor)
        return None
    pick = (min if best.get("mode", "min") == "min" else max)(candidates, key=candidates.get)
    with open(kept[pick], "rb") as source:
        atomic_write(target, lambda f: shutil.copyfileobj(source, f, 1 << 22))
    print(f"restored:    {show(target)} from {kept[pick].name} ({best.monitor} {candidates[pick]:.6g}, the best logged "
          f"of the {len(candidates)} checkpoints kept; it was missing from this finished run)", flush=True)
    return target


STATE_SHAPING = ("model.net", "schedule", "objective", "prediction_space", "loss.learn_variance", "noise", "latent",
                 "dataset.resolution", "dataset.channels", "conditioning._target_", "conditioning.num_classes",
                 "classifier.net", "autoencoder.vae", "text_encoder")
"""The settings a checkpoint's weights only work under: the network's shape and the process it learned."""


def checked_ckpt_path(cfg: DictConfig, held: list[str]) -> str:
    """``cfg.ckpt_path``, read (weights_only) and checked before Lightning sees it: a checkpoint of this task whose
    network and noise process match this command, started in a run dir that holds no other run's checkpoints."""
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist: give a .ckpt file written by an earlier run")
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    if held and path.resolve().parent != ckpt_dir.resolve():
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} would start a run in {cfg.output_dir}, which already holds checkpoints "
            f"({', '.join(held)}) of another run: pick another run_id (nothing was changed)"
        )
    saved = read_checkpoint(path, cfg.task_name)[1]
    changed, diff = changed_settings(saved, cfg, STATE_SHAPING)
    if changed:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} holds a model trained with other {', '.join(changed)} settings than this "
            f"command ({diff}): its weights cannot continue here; use the checkpoint's settings"
        )
    return str(path)


def changed_settings(saved: DictConfig, cfg: DictConfig, keys: tuple[str, ...]) -> tuple[list[str], str]:
    """The ``keys`` whose settings differ between a checkpoint's run config and ``cfg`` (speed knobs aside), and
    the differing values as ``key: checkpoint's -> this command's``."""
    now = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for run in (saved, now):  # speed knobs may change between the legs of a run
        for knob in SPEED_KNOBS:
            parent, _, key = knob.rpartition(".")
            if OmegaConf.select(run, parent) is not None:
                OmegaConf.select(run, parent).pop(key, None)
    changed = [key for key in keys if OmegaConf.select(saved, key) != OmegaConf.select(now, key)]
    leaves = []
    for key in changed:
        before, after = (config_leaves(OmegaConf.select(run, key), key) for run in (saved, now))
        leaves += [f"{k}: {before.get(k)} -> {after.get(k)}" for k in sorted(before.keys() | after.keys())
                   if before.get(k) != after.get(k)]
    return changed, "; ".join(leaves)


def config_leaves(node: Any, prefix: str) -> dict[str, Any]:
    """A config node as {dotted key: leaf value}."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node)
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in config_leaves(value, f"{prefix}.{key}").items()}
    return {prefix: node}
