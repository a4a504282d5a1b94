"""A sweep that can be rerun and checked first: completion markers (``done.json``) and the dry run.

* A fit that reached ``trainer.max_steps`` writes ``<run dir>/done.json``: its final metrics, the
  ``optimized_metric`` and its value, the global step, the job's overrides and its resolved config.
  The same command run again skips such a job (``skipped:``) and returns the recorded metric, so a
  sweeper gets the values of an uninterrupted sweep; an unfinished job resumes from ``last.ckpt``
  (``resume=auto``), a missing one starts. A marker of another experiment is refused.
* ``dry_run=true`` runs every check training applies (data, model, sampler, callbacks, loggers, the
  trainer and the batch split) without fitting, prints one line per job and, after a sweep, how many
  jobs would fail (exit status 1 if any). Nothing is written but what Hydra writes for every job:
  the job's dir with its ``.hydra/`` config and log.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from difflab.checkpointing import atomic_write
from difflab.errors import ConfigError
from difflab.summarize.training import DONE_FILE
from difflab.tasks.common import show
from difflab.tasks.resume import EXPERIMENT, changed_settings


_dry_run_results: list[tuple[str, str | None]] = []
"""(run dir, reason it would fail or None) of each dry-run job of this process's sweep, for the summary."""


def trains(cfg: DictConfig) -> bool:
    """Whether the job fits a model (train.py, train_classifier.py, train_vae.py), not evaluates one."""
    return cfg.get("trainer") is not None


def _max_steps(cfg: DictConfig) -> int:
    return int(cfg.trainer.get("max_steps") or -1)


def finished(cfg: DictConfig) -> dict[str, Any] | None:
    """The run dir's completion marker if it says this job is done; None if there is none or the job must train
    further (a larger ``trainer.max_steps``). A marker of a run with other settings is refused (ConfigError)."""
    path = Path(cfg.output_dir) / DONE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    changed, diff = changed_settings(OmegaConf.create(record["config"]), cfg, EXPERIMENT)
    if changed:
        raise ConfigError(
            f"{path} records a finished run with other {', '.join(changed)} settings than this command ({diff}): "
            f"pick another run_id for a new experiment (nothing was changed in {path.parent})"
        )
    return record if record["global_step"] >= _max_steps(cfg) else None


def mark_done(cfg: DictConfig, metrics: dict[str, float]) -> Path | None:
    """Write ``done.json`` (rank 0) if the fit reached ``trainer.max_steps``: not preempted, not diverged (that
    raises), and it trained (a rerun of a run finished before markers existed logs no metric). Returns the file."""
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    if _max_steps(cfg) <= 0 or not metrics or rank_zero_only.rank != 0 or not last.is_file():
        return None
    step = int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    if step < _max_steps(cfg):
        return None
    name = cfg.get("optimized_metric")
    record = {
        "global_step": step,
        "optimized_metric": name,
        "value": metrics.get(name) if name else None,
        "metrics": metrics,
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    return atomic_write(last.parent.parent / DONE_FILE, lambda f: f.write(json.dumps(record, indent=2).encode()))


def multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def swept_overrides() -> list[str]:
    """This job's overrides of the keys its sweep varies (``seed=1``), from the sweep's ``multirun.yaml``."""
    if not multirun():
        return []
    hydra_cfg = HydraConfig.get()
    parser = OverridesParser.create()
    keys = set(hydra_cfg.sweeper.get("params") or {})
    command = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if command.is_file():
        task = OmegaConf.load(command).hydra.overrides.task
        keys |= {o.key_or_group for o in parser.parse_overrides(list(task)) if o.is_sweep_override()}
    return [o.input_line for o in parser.parse_overrides(list(hydra_cfg.overrides.task)) if o.key_or_group in keys]


def dry_run(fit: Callable[[DictConfig], Any], cfg: DictConfig) -> None:
    """Check a job as training would (``fit`` stops before the trainer fits) and print its line. In a sweep a
    failing job returns normally, so every job is listed (:class:`DryRunSummary` sets the exit status); a
    single run raises its error."""
    run_dir = Path(cfg.output_dir)
    state, reason = "new", None
    try:
        record = finished(cfg) if trains(cfg) else None
        if record is not None:
            state = f"done: skipped, {record['optimized_metric']}={record['value']}"
        else:
            state = "resumes last.ckpt" if (run_dir / "checkpoints" / "last.ckpt").is_file() else "new"
            fit(cfg)
    except Exception as err:
        if not multirun():
            raise
        reason = str(err).strip() or type(err).__name__
    changes = " ".join(swept_overrides())
    verdict = f"FAIL: {reason}" if reason else f"OK ({state})"
    print(f"dry run:     {show(run_dir)}  {changes + '  ' if changes else ''}{verdict}", flush=True)
    _dry_run_results.append((show(run_dir), reason))


class DryRunSummary(Callback):
    """Hydra callback: after a ``dry_run=true`` sweep, print how many jobs would fail; exit status 1 if any."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _dry_run_results.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("dry_run") or not _dry_run_results:
            return
        failed = [run_dir for run_dir, reason in _dry_run_results if reason]
        names = f": {', '.join(failed)}" if failed else ""
        print(f"dry run:     {len(_dry_run_results)} jobs checked, {len(failed)} would fail{names}; nothing trained",
              flush=True)
        if failed:
            raise SystemExit(1)
