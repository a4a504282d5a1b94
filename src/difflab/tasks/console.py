"""A clean console for every entry point: each log line once, no dependency tips or deprecation warnings, and a
ConfigError (which already says what to do) as its message alone, without a traceback."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import TypeVar

import lightning as L
from omegaconf import DictConfig

from difflab.errors import ConfigError
from difflab.tasks.common import sweep_name

T = TypeVar("T")

OWN_HANDLER_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
"""Loggers that add their own stderr handler at import (the packages' __init__): the root logger's suffice."""
DEPENDENCIES = r"(lightning|lightning_fabric|pytorch_lightning|torch|torchmetrics|diffusers|transformers|hydra|omegaconf)"
"""Packages whose deprecation warnings are the dependency's business, not the user's (module regex)."""


def no_tips(record: logging.LogRecord) -> bool:
    """Drop Lightning's advertisements ("Tip: try installing ..."); keep every other record."""
    return "Tip:" not in record.getMessage()


def quiet_console() -> None:
    """Each Lightning INFO line once (through Hydra's handlers: console and the job's log file), without its tips,
    and no DeprecationWarning / FutureWarning raised inside a dependency."""
    if logging.getLogger().handlers:  # Hydra configured the root logger: Lightning's own handler would repeat it
        for name in OWN_HANDLER_LOGGERS:
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if no_tips not in logger.filters:
            logger.addFilter(no_tips)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=DEPENDENCIES)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # torch's, about Lightning's use of its pytree API


class QuietRanks(L.Callback):
    """:func:`quiet_console` in every rank: ``ddp_spawn`` starts its ranks as fresh interpreters, without the warning
    filters the launching process set."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        quiet_console()


def run_task(task: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """``task(cfg)`` on a quiet console; in a single run a ConfigError ends the process with its message and exit
    code 1, no traceback (in a sweep it propagates, so Hydra records the failed job and goes on)."""
    quiet_console()
    try:
        return task(cfg)
    except ConfigError as err:
        if sweep_name():
            raise
        raise SystemExit(f"Error: {err}") from None

