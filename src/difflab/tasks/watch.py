"""evaluate.py watch=RUN_DIR: score a training run's checkpoints as they are written, beside the training process.

Each ``<run>/checkpoints/step_*.ckpt`` not yet scored (and ``last.ckpt`` if its step has no score) is
evaluated by :func:`difflab.tasks.evaluate.evaluate` into ``<run>/eval/step_XXXXXX.json``, and its metrics
are logged into the run's W&B run (if it used logger=wandb) as ``eval/*`` against ``eval/global_step``.
A checkpoint is scored when its JSON exists, so the same command resumes without rescoring. The
watcher stops when the run has ended and every checkpoint is scored, or after ``timeout_minutes``
without a new checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from difflab.checkpointing import PERIODIC, periodic_checkpoints
from difflab.errors import ConfigError
from difflab.loggers import RUN_ID_FILE
from difflab.run_lock import is_locked, lock_holder
from difflab.summarize.training import DONE_FILE
from difflab.tasks.common import show
from difflab.tasks.evaluate import check_evaluation, evaluate, metric_names



def eval_path(run_dir: Path, step: int) -> Path:
    """Where the scores of the checkpoint at ``step`` go: ``<run>/eval/step_XXXXXX.json``."""
    return run_dir / "eval" / f"step_{step:06d}.json"


def checkpoint_step(path: Path) -> int:
    """The global step of a checkpoint: from its name (``step_000300.ckpt``), else read from the file."""
    match = PERIODIC.fullmatch(path.name)
    if match:
        return int(match.group(1))
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def pending(run_dir: Path, include_last: bool) -> list[tuple[int, Path]]:
    """(step, checkpoint) of the run's checkpoints without scores, by step; last.ckpt only if ``include_last``."""
    found = periodic_checkpoints(run_dir / "checkpoints")
    last = run_dir / "checkpoints" / "last.ckpt"
    if include_last and last.is_file():
        found.setdefault(checkpoint_step(last), last)
    return sorted((step, path) for step, path in found.items() if not eval_path(run_dir, step).exists())


def run_ended(run_dir: Path, max_steps: int | None) -> bool:
    """Whether training is over: ``done.json`` exists, or no live process holds the run's lock and
    ``last.ckpt`` has reached ``trainer.max_steps`` (a preempted run, lock gone but short of it, is still going)."""
    if (run_dir / DONE_FILE).is_file():
        return True
    if is_locked(run_dir):
        return False
    last = run_dir / "checkpoints" / "last.ckpt"
    return last.is_file() and (max_steps is None or max_steps < 0 or checkpoint_step(last) >= max_steps)


class WandbEval:
    """The training run's W&B run, resumed by the id in ``<run>/wandb_run_id`` on first use (the trainer writes
    it before its first checkpoint); eval/* per checkpoint."""

    def __init__(self, run_dir: Path, run_config: DictConfig) -> None:
        self.run_dir = run_dir
        self.settings = OmegaConf.select(run_config, "logger.wandb") or {}
        self.run: Any = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import wandb

        if self.run is None:
            self.run = wandb.init(
                id=(self.run_dir / RUN_ID_FILE).read_text().strip(), resume="allow", dir=str(self.run_dir),
                project=self.settings.get("project", "difflab"), entity=self.settings.get("entity"),
            )
            self.run.define_metric("eval/global_step")
            self.run.define_metric("eval/*", step_metric="eval/global_step")  # W&B refuses a step below its own
        self.run.log({"eval/global_step": step, **{f"eval/{k}": v for k, v in metrics.items()}})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def wait_for_run(run_dir: Path, poll_seconds: float, timeout_minutes: float) -> DictConfig:
    """The run's config (``.hydra/config.yaml``), waited for while the run has not started (a queued SLURM job)."""
    path = run_dir / ".hydra" / "config.yaml"
    written = run_dir / ".hydra" / "overrides.yaml"  # Hydra writes it after config.yaml (in place, not atomically)
    since, waiting = time.monotonic(), False
    while not written.is_file():
        if run_dir.exists() and lock_holder(run_dir) is None:  # neither starting nor a run dir
            raise ConfigError(f"watch={run_dir} is not a training run dir (it has no .hydra/config.yaml)")
        if time.monotonic() - since > timeout_minutes * 60:
            raise ConfigError(f"watch={run_dir}: no training run started there in timeout_minutes={timeout_minutes}")
        if not waiting:
            print(f"waiting:     for a training run to start in {show(run_dir)}", flush=True)
            waiting = True
        time.sleep(poll_seconds)
    run_config = OmegaConf.load(path)
    if run_config.get("task_name") != "train":
        raise ConfigError(f"watch={run_dir} is a '{run_config.get('task_name')}' run: give a train.py run dir")
    return run_config


def watch(cfg: DictConfig) -> dict[str, float]:
    """Score ``cfg.watch``'s checkpoints as they appear (see the module doc); returns the newest scores."""
    if cfg.get("ckpt") is not None:
        raise ConfigError(f"give ckpt={cfg.ckpt} or watch={cfg.watch}, not both: watch scores each checkpoint of a run")
    for key in ("poll_seconds", "timeout_minutes"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float)) or cfg[key] <= 0:
            raise ConfigError(f"{key} must be a positive number, got {cfg[key]}")
    check_evaluation(cfg, metric_names(cfg.metrics))  # before waiting for the first checkpoint
    run_dir = Path(cfg.watch).expanduser()
    run_config = wait_for_run(run_dir, cfg.poll_seconds, cfg.timeout_minutes)
    max_steps = OmegaConf.select(run_config, "trainer.max_steps")
    wandb_run = WandbEval(run_dir, run_config) if OmegaConf.select(run_config, "logger.wandb") else None
    print(f"watching:    {show(run_dir)} (every {cfg.poll_seconds} s; W&B: {'yes' if wandb_run else 'no'})", flush=True)
    scored = sorted(int(p.stem[5:]) for p in (run_dir / "eval").glob("step_*.json"))
    if scored:
        print(f"skipped:     {len(scored)} checkpoints already scored (steps {', '.join(map(str, scored))})",
              flush=True)
    latest: dict[str, float] = {}
    waited_since = time.monotonic()
    try:
        while True:
            ended = run_ended(run_dir, max_steps)  # before listing, so a last checkpoint written meanwhile is seen
            todo = pending(run_dir, include_last=ended)
            for step, ckpt in todo:
                latest = score(cfg, run_dir, step, ckpt, wandb_run)
            if todo:
                waited_since = time.monotonic()
            elif ended:
                print(f"done:        {show(run_dir)} has ended and every checkpoint is scored", flush=True)
                return latest
            elif time.monotonic() - waited_since > cfg.timeout_minutes * 60:
                print(f"stopped:     no new checkpoint for {cfg.timeout_minutes} min and {show(run_dir)} has not "
                      "ended; the same command resumes", flush=True)
                return latest
            else:
                time.sleep(cfg.poll_seconds)
    finally:
        if wandb_run is not None:
            wandb_run.finish()


def score(cfg: DictConfig, run_dir: Path, step: int, ckpt: Path, wandb_run: WandbEval | None) -> dict[str, float]:
    """Evaluate one checkpoint into ``<run>/eval/step_XXXXXX.json`` (and W&B); {} if it was rotated away meanwhile."""
    job = cfg.copy()
    OmegaConf.update(job, "ckpt", str(ckpt), force_add=True)
    try:
        results = evaluate(job, eval_path(run_dir, step))
    except ConfigError:
        if ckpt.exists():
            raise
        print(f"gone:        {show(ckpt)} was removed before it was scored (save_top_k)", flush=True)
        return {}
    metrics = {k: float(v) for k, v in results["metrics"].items()}
    if wandb_run is not None:
        wandb_run.log(step, metrics)
    values = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    print(f"scored:      step {step} ({show(ckpt)}): {values}", flush=True)
    return metrics
