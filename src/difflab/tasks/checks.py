"""Settings the entry points refuse before they write or train anything: numbers that must be finite or positive,
seeds, run ids, the trainer's length and validation interval, and directories a run will have to write into.

:class:`RunIdCheck` is a Hydra callback (``hydra.callbacks.run_id_check`` of each entry point's config): Hydra
creates the run dir from ``run_id`` before the task starts, so only a callback can refuse ``run_id=../../x`` in time.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from difflab.cache import cache_root
from difflab.errors import ConfigError

SEED_MAX = 2**32 - 1
"""The largest seed Lightning's ``seed_everything`` (numpy's legacy global RNG) accepts."""


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (a bool or a string is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_finite(cfg: DictConfig, *keys: str) -> None:
    """Refuse a ``cfg`` value that is not a finite number (nan and inf would silently give black images)."""
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not is_number(value) or not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not allowed: {key} must be a finite number")


def check_seed(seed: Any, upper: int | None = None) -> None:
    """Refuse a seed that is not an integer in [0, ``upper``] (numpy's SeedSequence refuses negative ones)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 or (upper is not None and seed > upper):
        allowed = "an integer >= 0" if upper is None else f"an integer in [0, {upper}]"
        raise ConfigError(f"seed={seed} is not allowed: seed must be {allowed}")


def check_run_id(run_id: Any) -> None:
    """Refuse a ``run_id`` that is not a plain directory name: it would put the run dir outside outputs/<task>/."""
    name = str(run_id)
    separators = {"/", os.sep, os.altsep} - {None}
    if name in ("", ".", "..") or any(sep in name for sep in separators):
        raise ConfigError(
            f"run_id={name!r} is not a plain name: the run dir is outputs/<task>/<run_id>, so a run_id with '/' or "
            "'..' would write outside it; allowed: a non-empty name without '/' other than '.' and '..' "
            "(e.g. run_id=baseline)"
        )
    if name == "latest":
        raise ConfigError(
            "run_id='latest' is the name of the link to the newest run (outputs/<task>/latest): pick another run_id"
        )


class RunIdCheck(Callback):
    """Hydra callback: exit with status 2 and the error on stderr before Hydra creates a run dir from a bad run_id.

    Hydra turns an exception raised in a callback into a warning and goes on, so this exits instead.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config)

    @staticmethod
    def check(config: DictConfig) -> None:
        """Exit(2) with the ConfigError of :func:`check_run_id` if ``config.run_id`` is not a plain name."""
        if "run_id" not in config:
            return
        try:
            check_run_id(config.run_id)
        except ConfigError as err:
            print(f"Error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)


def unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be created or written as a directory, or None when it can.

    Its nearest existing ancestor must be a directory this process may write into; nothing is created.
    """
    existing = path.expanduser().absolute()
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_cache_dir(path: Path, moved_by: str) -> None:
    """Refuse a cache dir that cannot be created or written, saying which setting (``moved_by``) puts it elsewhere."""
    reason = unwritable(path)
    if reason:
        raise ConfigError(
            f"the cache dir {path} cannot be written ({reason}): set {moved_by}, or DIFFLAB_CACHE=DIR "
            f"(the root of difflab's caches, now {cache_root()}), to a directory you can write to"
        )


def check_trainer(trainer: DictConfig) -> None:
    """Refuse trainer lengths that train nothing and validation intervals Lightning cannot use (its semantics:
    max_steps=-1 is no step limit, max_epochs=-1 no epoch limit)."""
    max_steps, max_epochs = trainer.get("max_steps", -1), trainer.get("max_epochs")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or (max_steps <= 0 and max_steps != -1):
        raise ConfigError(
            f"trainer.max_steps={max_steps} is not allowed: a positive number of optimizer steps, "
            "or -1 (no step limit) with trainer.max_epochs set to a positive integer"
        )
    epochs_ok = max_epochs is None or (isinstance(max_epochs, int) and not isinstance(max_epochs, bool)
                                       and (max_epochs > 0 or max_epochs == -1))
    if not epochs_ok:
        raise ConfigError(
            f"trainer.max_epochs={max_epochs} is not allowed: a positive integer, or -1 or null (no epoch limit)"
        )
    if max_steps == -1 and not (isinstance(max_epochs, int) and max_epochs > 0):
        raise ConfigError(
            f"trainer.max_steps=-1 with trainer.max_epochs={max_epochs} sets no end to training: "
            "give a positive trainer.max_steps, or a positive trainer.max_epochs"
        )
    interval, per_epoch = trainer.get("val_check_interval"), trainer.get("check_val_every_n_epoch")
    steps_ok = isinstance(interval, int) and interval > 0
    fraction_ok = isinstance(interval, float) and 0 < interval <= 1 and per_epoch is not None
    if is_number(interval) and not (steps_ok or fraction_ok):
        raise ConfigError(
            f"trainer.val_check_interval={interval} is not allowed: a positive integer number of steps, "
            "or a fraction of an epoch in (0, 1] with trainer.check_val_every_n_epoch set "
            f"(now {per_epoch})"
        )


def check_optimizer(cfg: DictConfig, node: str) -> None:
    """Refuse ``<node>.lr`` that is not a finite number > 0, ``<node>.weight_decay`` not a finite number >= 0."""
    lr, weight_decay = cfg[node].get("lr"), cfg[node].get("weight_decay", 0.0)
    if not is_number(lr) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"{node}.lr={lr} is not allowed: the learning rate must be a finite number > 0 (e.g. 1e-4)")
    if not is_number(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ConfigError(
            f"{node}.weight_decay={weight_decay} is not allowed: weight decay must be a finite number >= 0 (0: none)"
        )


def check_training_settings(cfg: DictConfig) -> None:
    """Refuse bad settings of train.py, train_classifier.py and train_vae.py that need no data to judge: the run_id,
    seed, trainer length and validation interval, learning rate and weight decay, and the latent cache dir."""
    check_run_id(cfg.run_id)
    check_seed(cfg.seed, SEED_MAX)
    check_trainer(cfg.trainer)
    for node in ("optimizer", "classifier", "autoencoder"):
        if node in cfg and "lr" in cfg[node]:
            check_optimizer(cfg, node)
    if OmegaConf.select(cfg, "latent.cache"):
        cache_dir = cfg.latent.cache_dir
        check_cache_dir(Path(cache_dir).expanduser() if cache_dir else cache_root() / "latents", "latent.cache_dir=DIR")


def check_sampling_settings(cfg: DictConfig) -> None:
    """Refuse bad settings of sample.py and evaluate.py that need no checkpoint to judge: the seed, guidance
    scales that are not finite, an empty list of labels, an unknown precision or batch size."""
    check_seed(cfg.seed)
    check_finite(cfg, "guidance_scale", "guidance_rescale", "classifier_scale")
    if cfg.get("precision", "fp32") not in ("fp32", "bf16"):
        raise ConfigError(f"precision={cfg.precision} is not allowed: fp32, or bf16 (the UNet under bf16 autocast)")
    if isinstance(cfg.batch_size, str) and cfg.batch_size != "auto":
        raise ConfigError(f"batch_size={cfg.batch_size} is not allowed: a positive integer, or auto")
    if not 0 <= cfg.guidance_rescale <= 1:
        raise ConfigError(f"guidance_rescale={cfg.guidance_rescale} is not allowed: it must lie in [0, 1] (0: off)")
    if OmegaConf.is_list(cfg.labels) and len(cfg.labels) == 0:
        raise ConfigError(
            "labels=[] names no class: allowed are labels=all (equal counts of every class) or a non-empty list "
            "of class ids / names, e.g. labels=[0,3]"
        )
