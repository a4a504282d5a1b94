"""Config -> objects: Hydra's ``instantiate`` with errors that name the config group, and the run configs of
checkpoints written before a config group existed, brought up to today's groups."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from difflab.errors import ConfigError


def instantiate_node(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)``, turning the error Hydra wraps around a bad value into a ConfigError naming
    ``what`` (the config group: "model", "dataset", ...)."""
    try:
        return instantiate(node, **kwargs)
    except Exception as err:
        raise (config_error(err) or ConfigError(f"{what} config is invalid: {root_cause(err)}")) from err


def config_error(err: BaseException | None) -> ConfigError | None:
    """The outermost ConfigError in ``err``'s chain of causes (it says the most), or None."""
    while err is not None and not isinstance(err, ConfigError):
        err = err.__cause__
    return err


def root_cause(err: BaseException) -> BaseException:
    """The innermost cause of ``err``: what actually went wrong under Hydra's wrapping."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


LOSS = {"_target_": "difflab.objectives.DiffusionLoss", "weighting": "uniform", "min_snr_gamma": 5.0,
        "learn_variance": False, "vlb_weight": 0.001, "timestep_sampling": "uniform", "space": "white"}
"""``loss`` of runs from before the loss group existed (conf/loss/simple.yaml)."""
OPTIMIZER_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "adam_betas": "betas"}
"""``model.KEY`` of runs from before the optimizer group -> ``optimizer.KEY``."""
DATASET_KEYS = {
    "difflab.data.DigitsDataModule": {"captions": False},
    "difflab.data.ImageFolderDataModule": {
        "captions": False, "caption_column": "text", "allow_missing_captions": False,
    },
}
"""``dataset`` keys added since runs were first written, per DataModule, with the values that keep those runs'
behaviour (no captions), so their run dirs still resume with today's defaults."""


def upgrade_run_config(run_config: DictConfig) -> DictConfig:
    """A train.py run config as today's groups build it: ``loss``, ``conditioning``, ``optimizer`` and
    ``lr_scheduler`` built by ``_target_`` (a copy; configs already in that form come back equal).

    Checkpoints of earlier releases held ``loss`` as plain keys (or none), ``conditioning.enabled`` and AdamW's
    settings and the warm-up inside ``model``, and lacked the caption keys of ``dataset`` (:data:`DATASET_KEYS`),
    ``loss.space`` and ``prediction_space`` (white: what they trained with); they load, resume and compare as if
    written today.
    """
    cfg = OmegaConf.to_container(run_config)
    if "model" not in cfg:
        return OmegaConf.create(cfg)
    dataset = cfg.get("dataset") or {}
    cfg["dataset"] = {**DATASET_KEYS.get(dataset.get("_target_"), {}), **dataset}
    cfg["loss"] = {**LOSS, **(cfg.get("loss") or {})}
    cfg.setdefault("prediction_space", "white")
    cond = cfg.get("conditioning")
    if cond is None or "enabled" in cond:
        enabled = bool(cond and cond.pop("enabled"))
        cfg["conditioning"] = (
            {"_target_": "difflab.guidance.ClassLabels", **(cond or {})} if enabled
            else {"_target_": "difflab.guidance.Unconditional"}
        )
    model = cfg["model"]
    if "optimizer" not in cfg:
        cfg["optimizer"] = {"_target_": "torch.optim.AdamW", "_partial_": True, "_convert_": "all", "lr": 2e-4,
                            "weight_decay": 0.0, "betas": [0.9, 0.999]}
        for old, new in OPTIMIZER_KEYS.items():
            if old in model:
                cfg["optimizer"][new] = model[old]
    if "lr_scheduler" not in cfg:
        cfg["lr_scheduler"] = {"_target_": "difflab.optim.constant", "_partial_": True,
                               "warmup_steps": model.get("warmup_steps", 0)}
    for key in (*OPTIMIZER_KEYS, "warmup_steps"):
        model.pop(key, None)
    return OmegaConf.create(cfg)
