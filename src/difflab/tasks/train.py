"""train.py, train_classifier.py and train_vae.py: build the module and the data from the config, then fit."""

from __future__ import annotations

import logging
import os
import signal
import warnings
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from difflab.build import (
    build_autoencoder,
    build_classifier,
    build_module,
    instantiate_node,
    text_conditioned,
    training_config,
    with_captions,
    with_classes,
)
from difflab.callbacks.preemption import Preemption
from difflab.checkpointing import AtomicCheckpointIO, remove_orphan_temporaries
from difflab.distributed import RankConsistency, forward_signals_to_children, launch_settings
from difflab.errors import ConfigError
from difflab.latent import cached_latents, use_stored_latents
from difflab.module import DiffusionModule
from difflab.run_lock import RunDirLock
from difflab.tasks.checks import check_training_settings
from difflab.tasks.common import show
from difflab.tasks.console import QuietRanks
from difflab.tasks.feature_classifier import resolved_features
from difflab.tasks.report import build_logger, report_training
from difflab.tasks.resume import resume_from
from difflab.vae import latent_shape

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model of ``cfg`` on its dataset; returns the final callback metrics (val/loss, ...)."""
    check_training_settings(cfg)
    L.seed_everything(cfg.seed, workers=True)
    cfg = with_captions(cfg)
    datamodule = instantiate_node(cfg.dataset, "dataset", seed=cfg.seed)  # seed: of the data order and augmentations
    datamodule.setup("fit")  # bad data fails here, before a trainer or any output exists
    cfg = training_config(cfg, list(datamodule.class_names), datamodule.train_set.captions)
    module = build_module(cfg)
    if text_conditioned(cfg):
        module.conditioning.warn_truncated(datamodule.train_set.captions)
        if not cfg.get("dry_run") and int(os.environ.get("LOCAL_RANK", "0")) == 0:  # sample.py needs only the checkpoint
            module.conditioning.tokenizer.save_pretrained(Path(cfg.output_dir) / "tokenizer")
    data_shape = datamodule.image_shape
    if data_shape != module.image_shape:
        raise ConfigError(f"the dataset's images are {data_shape} but the model expects {module.image_shape}")
    module.noise.check_num_samples(len(datamodule.train_set))
    if datamodule.stored_latents is not None:  # latent shards: the encoder stays out of the loop
        use_stored_latents(module.latent, datamodule.stored_latents)
    elif module.latent is not None and module.latent.cache and not cfg.get("dry_run"):  # serve the cached latents
        path, train_latents, val_latents = cached_latents(datamodule, module.latent, cfg.seed)
        datamodule.serve_latents(train_latents, val_latents)
        print(f"latent cache: {show(path)}", flush=True)
    module.check_sampler(instantiate_node(cfg.sampler, "sampler"))  # the sampler of the training-time grids
    if OmegaConf.select(cfg, "callbacks.evaluation") and not cfg.get("dry_run"):  # in-training FID: its features
        features = resolved_features(cfg.features, cfg.dataset, [], train_classifier)
        cfg = OmegaConf.merge(cfg, {"features": features})
    with warnings.catch_warnings():
        if module.latent is not None:  # the frozen VAE stays in eval mode on purpose
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
        return fit(cfg, module, datamodule)


def train_classifier(cfg: DictConfig) -> dict[str, float]:
    """Fit a noise-aware classifier p(y | x_t, t) on the dataset and schedule of ``cfg`` (classifier guidance)."""
    check_training_settings(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate_node(cfg.dataset, "dataset", seed=cfg.seed)
    datamodule.setup("fit")
    cfg = with_classes(cfg, "classifier.net", list(datamodule.class_names), "a classifier")
    cfg.class_names = list(datamodule.class_names)
    return fit(cfg, build_classifier(cfg), datamodule)


def train_vae(cfg: DictConfig) -> dict[str, float]:
    """Stage 1 of latent diffusion: fit the AutoencoderKL of ``cfg.autoencoder``; it is saved to ``<run dir>/vae``."""
    check_training_settings(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate_node(cfg.dataset, "dataset")
    datamodule.setup("fit")
    module = build_autoencoder(cfg)
    latent_shape(module.vae, datamodule.image_shape)  # channels and size checked before training
    return fit(cfg, module, datamodule)


def fit(cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule) -> dict[str, float]:
    """Fit ``module`` on ``datamodule`` with the trainer, callbacks and loggers of ``cfg``, from where
    :func:`~difflab.tasks.resume.resume_from` says; reports the run (rank 0) and returns the callback metrics.

    The run dir is locked for the whole fit (:mod:`difflab.run_lock`): a second command on it is refused.
    ``dry_run=true`` builds the trainer (every check) and returns no metrics, without locking or writing anything.
    """
    if cfg.get("dry_run"):
        build_trainer(cfg, module, datamodule)
        return {}
    with RunDirLock(cfg.output_dir):  # one process (and its ranks) per run dir, before any checkpoint is read
        for orphan in remove_orphan_temporaries(Path(cfg.output_dir) / "checkpoints"):
            print(f"removed:     {show(orphan)} (a partial checkpoint of a killed process)", flush=True)
        ckpt_path = resume_from(cfg)
        trainer, forward = build_trainer(cfg, module, datamodule)
        with forward_signals_to_children(forward):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if trainer.is_global_zero:
            report_training(Path(cfg.output_dir), metrics, cfg)
        return metrics


def build_trainer(
    cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule
) -> tuple[L.Trainer, list[signal.Signals]]:
    """The trainer of ``cfg`` with its callbacks and loggers, the global batch split over its processes; and the
    preemption signals to forward to ``ddp_spawn`` ranks."""
    callbacks = [instantiate_node(c, f"callbacks.{name}") for name, c in (cfg.get("callbacks") or {}).items() if c]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress callback it was told to omit
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = [build_logger(c, Path(cfg.output_dir)) for c in (cfg.get("logger") or {}).values() if c]
    launch = launch_settings(cfg.trainer.get("strategy"))
    launch["plugins"] = [AtomicCheckpointIO(), *launch.get("plugins", [])]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **launch)
    if hasattr(datamodule, "split_batch"):
        per_device = datamodule.split_batch(trainer.world_size, trainer.accumulate_grad_batches)
        if trainer.world_size > 1 or trainer.accumulate_grad_batches > 1:
            log.info("global batch %d = %d process%s x %d accumulated x %d per step", datamodule.batch_size,
                     trainer.world_size, "es" if trainer.world_size > 1 else "", trainer.accumulate_grad_batches,
                     per_device)
    if trainer.world_size > 1:
        trainer.callbacks.append(QuietRanks())
    if trainer.world_size > 1 and isinstance(module, DiffusionModule):
        trainer.callbacks.append(RankConsistency(cfg.output_dir))
    preemption = next((c for c in callbacks if isinstance(c, Preemption)), None)
    return trainer, preemption.signals if preemption and launch.get("strategy") == "ddp_spawn" else []
