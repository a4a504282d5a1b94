"""What a finished job reports: the sweeper's metric, the run dir's files, the ``latest`` link; and its loggers."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from difflab.errors import ConfigError
from difflab.tasks.common import show, sweep_name
from difflab.tasks.console import run_task
from difflab.tasks.sweep import dry_run, finished, mark_done, trains

log = logging.getLogger(__name__)


def run_job(fit: Callable[[DictConfig], dict[str, float]], cfg: DictConfig) -> float | None:
    """An entry point's job: ``fit(cfg)``, returning ``cfg.optimized_metric`` to a sweeper (warns in a sweep if missing).

    A fitting job whose run dir holds a matching completion marker (:mod:`~difflab.tasks.sweep`) is skipped and
    returns the recorded metric; one that reaches ``trainer.max_steps`` writes the marker. ``dry_run=true``
    checks the job instead of running it. A failure is written to the job's log (``<run dir>/<task>.log``)
    before it propagates, so a failed job of a sweep is recorded in its own dir while Hydra goes on with the others;
    a ConfigError of a single run ends it with its message alone (:func:`~difflab.tasks.console.run_task`).
    """
    return run_task(lambda c: _run_job(fit, c), cfg)


def _run_job(fit: Callable[[DictConfig], dict[str, float]], cfg: DictConfig) -> float | None:
    if cfg.get("dry_run"):
        return dry_run(fit, cfg)
    try:
        record = finished(cfg) if trains(cfg) else None
        if record is not None:
            metrics = record["metrics"]
            print(f"skipped:     {show(Path(cfg.output_dir))} (done: {record['optimized_metric']}={record['value']})",
                  flush=True)
        else:
            metrics = fit(cfg)
            if trains(cfg):
                mark_done(cfg, metrics)
    except Exception as err:
        if sweep_name() or not isinstance(err, ConfigError):  # a single run's ConfigError is shown once, by run_task
            log.error("job failed: %s: %s", type(err).__name__, err)
        raise
    name = cfg.get("optimized_metric")
    if name and name not in metrics and sweep_name():
        log.warning(
            "optimized_metric=%s was not logged (logged: %s); validation runs every trainer.val_check_interval=%s steps",
            name, sorted(metrics), cfg.trainer.get("val_check_interval"),
        )
    return metrics.get(name) if name else None


def build_logger(node: DictConfig, run_dir: Path) -> Any:
    """A logger from its config; ``name: null`` / ``group: null`` become the run's (``<sweep>/<job>``) and sweep's names."""
    sweep = sweep_name()
    names = {}
    if node.get("name", "") is None:
        names["name"] = f"{sweep}/{run_dir.name}" if sweep else run_dir.name
    if node.get("group", "") is None and sweep:
        names["group"] = sweep
    return instantiate(node, **names)


NEXT_USE = {
    "train": "python sample.py ckpt={latest}",
    "vae": "python train.py latent=vae latent.path={latest}/vae",
}
"""How the newest run of each task is used next, printed beside the ``latest`` link (classifiers: classifier_use)."""


def classifier_use(cfg: DictConfig, latest: str) -> str:
    """A noise-aware classifier guides sampling; a clean one gives evaluation features."""
    if cfg.classifier.get("noise_aware", True):
        return f"sample.py classifier={latest}"
    return f"features=classifier features.path={latest}"


def report_training(run_dir: Path, metrics: dict[str, float], cfg: DictConfig) -> None:
    lines = [f"run dir:     {show(run_dir)}", f"checkpoint:  {show(run_dir / 'checkpoints' / 'last.ckpt')}"]
    for label, sub in (("samples:", "samples"), ("recon grid:", "reconstructions")):
        grids = sorted((run_dir / sub).glob("step_*.png"))
        if grids:
            lines.append(f"{label:<13}{show(grids[-1])}")
    if (run_dir / "vae" / "config.json").is_file():
        lines.append(f"vae:         {show(run_dir / 'vae')}")
    lines += [f"{k}: {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith(("val/", "eval/"))]
    if default_single_run(run_dir):
        latest = link_latest(run_dir)
        if latest:
            shown = show(latest)
            use = classifier_use(cfg, shown) if "classifier" in cfg else NEXT_USE.get(cfg.task_name, "").format(latest=shown)
            lines.append(f"latest:      {shown} -> {run_dir.name}" + (f" ({use})" if use else ""))
    print("\n".join(lines), flush=True)


def default_single_run(run_dir: Path) -> bool:
    """``run_dir`` is the run dir of a single (not -m) Hydra run, the config's own, not one the user picked (nor a
    run another task started inside it, such as evaluate.py's feature classifier)."""
    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    picked = any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra)
    own = Path(hydra_cfg.runtime.output_dir).resolve() == run_dir.resolve()
    return hydra_cfg.mode == RunMode.RUN and not picked and own


def link_latest(run_dir: Path) -> Path | None:
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
