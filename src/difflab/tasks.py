"""The bodies of the entry points (train, train_classifier, train_vae, sample, evaluate), as plain functions tests call."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from difflab.callbacks import Preemption
from difflab.checkpointing import AtomicCheckpointIO, atomic_write, newest_readable, read_checkpoint_file
from difflab.classifier import ClassifierModule
from difflab.data.base import SPLITS
from difflab.distributed import RankConsistency, forward_signals_to_children, launch_settings
from difflab.errors import ConfigError
from difflab.guidance import balanced_labels
from difflab.images import save_grid, to_uint8
from difflab.latent import use_cached_latents
from difflab.likelihood import bits_per_dim, check_supported, nll_sampler, variance_name
from difflab.metrics import dataset_description, reference_features, reference_images, sample_quality
from difflab.module import DiffusionModule
from difflab.samplers import Sampler
from difflab.summarize import RESULTS_FILE
from difflab.vae import VAEModule, latent_shape

log = logging.getLogger(__name__)

SPEED_KNOBS = ("model.compile", "model.channels_last")
"""Settings that change how fast a run trains, not what it learns: a resumed run may change them."""


def _instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """instantiate(node), turning the error Hydra wraps around a bad value into a ConfigError naming ``what``."""
    try:
        return instantiate(node, **kwargs)
    except Exception as err:
        raise (_config_error(err) or ConfigError(f"{what} config is invalid: {_root_cause(err)}")) from err


LOSS_DEFAULTS = {"weighting": "uniform", "min_snr_gamma": 5.0, "learn_variance": False, "vlb_weight": 0.001,
                 "timestep_sampling": "uniform"}
"""``cfg.loss`` of runs from before the loss group existed (their checkpoints still load)."""


def build_module(cfg: DictConfig) -> DiffusionModule:
    """The DiffusionModule of a run config: ``cfg.model`` with the schedule, objective, loss and conditioning of ``cfg``.

    The UNet's shape follows the data: its size, C channels in (2C with self-conditioning), C out (2C with a
    learned variance).
    """
    loss = {**LOSS_DEFAULTS, **(cfg.get("loss") or {})}
    image_shape = (int(cfg.dataset.channels), int(cfg.dataset.resolution), int(cfg.dataset.resolution))
    latent = None
    if OmegaConf.select(cfg, "latent._target_") is not None:
        if OmegaConf.is_missing(cfg.latent, "path"):
            raise ConfigError(
                "latent=vae needs latent.path=DIR, a diffusers AutoencoderKL directory: outputs/vae/latest/vae from "
                "train_vae.py, or a local copy of a public VAE (README: Latent diffusion)"
            )
        latent = _instantiate(cfg.latent, "latent", image_shape=image_shape)
        with open_dict(cfg):
            cfg.latent.fingerprint = latent.fingerprint  # saved with the run: a later load refuses a changed VAE
    channels, size, _ = image_shape if latent is None else latent.shape
    if latent is not None:
        unet_factor = 2 ** (len(cfg.model.net.unet.block_out_channels) - 1)
        if size % unet_factor:
            vae_factor = image_shape[1] // size
            raise ConfigError(
                f"the latents are {channels}x{size}x{size} ({image_shape[1]}x{image_shape[2]} images through the VAE's "
                f"downsampling by {vae_factor}): {size} is not divisible by the UNet's downsampling factor {unet_factor}; "
                f"use a dataset.resolution that is a multiple of {vae_factor * unet_factor}, or a model with fewer blocks"
            )
    self_condition = bool(OmegaConf.select(cfg, "model.net.self_condition", default=False))
    unet: dict[str, Any] = {
        "sample_size": size,
        "in_channels": channels * (2 if self_condition else 1),
        "out_channels": channels * (2 if loss["learn_variance"] else 1),
    }
    extra: dict[str, Any] = {}
    cond = cfg.get("conditioning")
    if cond is not None and cond.enabled:
        if not cond.num_classes:
            raise ConfigError("conditioning=class needs conditioning.num_classes (taken from a dataset with classes)")
        n = int(cond.num_classes)
        extra = {"num_classes": n, "p_uncond": cond.p_uncond}
        unet["num_class_embeds"] = n + 1
    module = _instantiate(
        cfg.model, "model", schedule=_instantiate(cfg.schedule, "schedule"), objective=cfg.get("objective", "eps"),
        weighting=loss["weighting"], min_snr_gamma=loss["min_snr_gamma"], vlb_weight=loss["vlb_weight"],
        timestep_sampling=loss["timestep_sampling"], seed=int(cfg.get("seed", 0)),
        net={"learn_variance": loss["learn_variance"], "unet": unet}, **extra,
        noise=_instantiate(cfg.noise, "noise", shape=(channels, size, size)) if cfg.get("noise") else None,
        latent=latent,
    )
    module.save_hyperparameters({"run_config": OmegaConf.to_container(cfg, resolve=True)})
    return module


def build_classifier(cfg: DictConfig) -> ClassifierModule:
    """The ClassifierModule of a classifier run config (``cfg.classifier`` with ``cfg.schedule``)."""
    module = _instantiate(cfg.classifier, "classifier", schedule=_instantiate(cfg.schedule, "schedule"))
    module.save_hyperparameters({"run_config": OmegaConf.to_container(cfg, resolve=True)})
    return module


def build_autoencoder(cfg: DictConfig) -> VAEModule:
    """The VAEModule of a train_vae.py run config (``cfg.autoencoder``)."""
    module = _instantiate(cfg.autoencoder, "autoencoder")
    module.save_hyperparameters({"run_config": OmegaConf.to_container(cfg, resolve=True)})
    return module


def _config_error(err: BaseException | None) -> ConfigError | None:
    """The outermost ConfigError in ``err``'s chain of causes (it says the most), or None."""
    while err is not None and not isinstance(err, ConfigError):
        err = err.__cause__
    return err


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _labelled_classes(cfg: DictConfig, datamodule: Any, node: DictConfig, what: str) -> None:
    """Fill ``node.num_classes`` and ``node.class_names`` from the dataset, or fail naming the mismatch."""
    names = list(datamodule.class_names)
    if not names:
        raise ConfigError(
            f"{what} needs a dataset with classes; dataset {cfg.dataset._target_} has none "
            "(image_folder: put each class's images in its own sub-folder)"
        )
    if node.num_classes is None:
        node.num_classes = len(names)
    elif node.num_classes != len(names):
        raise ConfigError(f"{what}: num_classes={node.num_classes}, but the dataset has {len(names)} classes")
    if "class_names" in node:
        node.class_names = names


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model of ``cfg`` on its dataset; returns the final callback metrics (val/loss, ...)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = _instantiate(cfg.dataset, "dataset", seed=cfg.seed)  # seed: of the data order and augmentations
    datamodule.setup("fit")  # bad data fails here, before a trainer or any output exists
    if cfg.get("conditioning") is not None and cfg.conditioning.enabled:
        _labelled_classes(cfg, datamodule, cfg.conditioning, "conditioning=class")
    module = build_module(cfg)
    data_shape = tuple(datamodule.train_set.images.shape[1:])
    if data_shape != module.image_shape:
        raise ConfigError(f"the dataset's images are {data_shape} but the model expects {module.image_shape}")
    module.noise.check_num_samples(len(datamodule.train_set))
    if module.latent is not None and module.latent.cache:
        print(f"latent cache: {_show(use_cached_latents(datamodule, module.latent, cfg.seed))}", flush=True)
    module.check_sampler(_instantiate(cfg.sampler, "sampler"))  # the sampler of the training-time grids
    with warnings.catch_warnings():
        if module.latent is not None:  # the frozen VAE stays in eval mode on purpose
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
        return _fit(cfg, module, datamodule)


def run_job(fit: Callable[[DictConfig], dict[str, float]], cfg: DictConfig) -> float | None:
    """An entry point's job: ``fit(cfg)``, returning ``cfg.optimized_metric`` to a sweeper (warns in a sweep if missing).

    A failure is written to the job's log (``<run dir>/<task>.log``) before it propagates, so a
    failed job of a sweep is recorded in its own dir while Hydra goes on with the others.
    """
    try:
        metrics = fit(cfg)
    except Exception as err:
        log.error("job failed: %s: %s", type(err).__name__, err)
        raise
    name = cfg.get("optimized_metric")
    if name and name not in metrics and _sweep_name():
        log.warning(
            "optimized_metric=%s was not logged (logged: %s); validation runs every trainer.val_check_interval=%s steps",
            name, sorted(metrics), cfg.trainer.get("val_check_interval"),
        )
    return metrics.get(name) if name else None


def train_classifier(cfg: DictConfig) -> dict[str, float]:
    """Fit a noise-aware classifier p(y | x_t, t) on the dataset and schedule of ``cfg`` (classifier guidance)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = _instantiate(cfg.dataset, "dataset", seed=cfg.seed)
    datamodule.setup("fit")
    _labelled_classes(cfg, datamodule, cfg.classifier.net, "a classifier")
    cfg.class_names = list(datamodule.class_names)
    return _fit(cfg, build_classifier(cfg), datamodule)


def train_vae(cfg: DictConfig) -> dict[str, float]:
    """Stage 1 of latent diffusion: fit the AutoencoderKL of ``cfg.autoencoder``; it is saved to ``<run dir>/vae``."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.dataset)
    datamodule.setup("fit")
    module = build_autoencoder(cfg)
    latent_shape(module.vae, datamodule.train_set.images.shape[1:])  # channels and size checked before training
    return _fit(cfg, module, datamodule)


def _fit(cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule) -> dict[str, float]:
    ckpt_path = _resume_from(cfg)
    callbacks = [_instantiate(c, f"callbacks.{name}") for name, c in (cfg.get("callbacks") or {}).items() if c]
    loggers = [_logger(c, Path(cfg.output_dir)) for c in (cfg.get("logger") or {}).values() if c]
    launch = launch_settings(cfg.trainer.get("strategy"))
    launch["plugins"] = [AtomicCheckpointIO(), *launch.get("plugins", [])]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **launch)
    if hasattr(datamodule, "split_batch"):
        per_device = datamodule.split_batch(trainer.world_size, trainer.accumulate_grad_batches)
        if trainer.world_size > 1 or trainer.accumulate_grad_batches > 1:
            log.info("global batch %d = %d process%s x %d accumulated x %d per step", datamodule.batch_size,
                     trainer.world_size, "es" if trainer.world_size > 1 else "", trainer.accumulate_grad_batches,
                     per_device)
    if trainer.world_size > 1 and isinstance(module, DiffusionModule):
        trainer.callbacks.append(RankConsistency(cfg.output_dir))
    preemption = next((c for c in callbacks if isinstance(c, Preemption)), None)
    forward = preemption.signals if preemption and launch.get("strategy") == "ddp_spawn" else []
    with forward_signals_to_children(forward):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        _report_training(Path(cfg.output_dir), metrics, cfg)
    return metrics


def _newest_readable(last: Path, task_name: str) -> tuple[Path, DictConfig]:
    """``last`` and its run config, or if it cannot be read, the newest periodic checkpoint beside it that can."""
    path, (_, saved), err = newest_readable(last, lambda p: _read_checkpoint(p, task_name))
    if err is not None:
        print(f"unreadable:  {_show(last)} ({err}); falling back to {path.name}", flush=True)
    return path, saved


def _sweep_name() -> str | None:
    """The name of the Hydra sweep (-m) this job belongs to; None for a single run."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def _logger(node: DictConfig, run_dir: Path) -> Any:
    """A logger from its config; ``name: null`` / ``group: null`` become the run's (``<sweep>/<job>``) and sweep's names."""
    sweep = _sweep_name()
    names = {}
    if node.get("name", "") is None:
        names["name"] = f"{sweep}/{run_dir.name}" if sweep else run_dir.name
    if node.get("group", "") is None and sweep:
        names["group"] = sweep
    return instantiate(node, **names)


def _resume_from(cfg: DictConfig) -> str | None:
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
        return _checked_ckpt_path(cfg, held)
    if not held:
        return None
    if resume == "never":
        raise ConfigError(
            f"{last.parent} already holds checkpoints and resume=never: pick another run_id, or resume=auto to continue it"
        )
    last, saved = _newest_readable(last, cfg.task_name)
    keys = ("model", "schedule", "objective", "loss", "noise", "latent", "dataset", "conditioning", "classifier",
            "autoencoder", "seed")
    changed, diff = _changed_settings(saved, cfg, keys)
    if changed:
        raise ConfigError(
            f"{last} was written by a run with other {', '.join(changed)} settings than this command ({diff}): "
            f"pick another run_id for a new experiment (nothing was changed in {last.parent.parent})"
        )
    print(f"resuming:    {_show(last)}", flush=True)
    return str(last)


STATE_SHAPING = ("model.net", "schedule", "objective", "loss.learn_variance", "noise", "latent", "dataset.resolution",
                 "dataset.channels", "conditioning.enabled", "conditioning.num_classes", "classifier.net",
                 "autoencoder.vae")
"""The settings a checkpoint's weights only work under: the network's shape and the process it learned."""


def _checked_ckpt_path(cfg: DictConfig, held: list[str]) -> str:
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
    saved = _read_checkpoint(path, cfg.task_name)[1]
    changed, diff = _changed_settings(saved, cfg, STATE_SHAPING)
    if changed:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} holds a model trained with other {', '.join(changed)} settings than this "
            f"command ({diff}): its weights cannot continue here; use the checkpoint's settings"
        )
    return str(path)


def _changed_settings(saved: DictConfig, cfg: DictConfig, keys: tuple[str, ...]) -> tuple[list[str], str]:
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
        before, after = (_leaves(OmegaConf.select(run, key), key) for run in (saved, now))
        leaves += [f"{k}: {before.get(k)} -> {after.get(k)}" for k in sorted(before.keys() | after.keys())
                   if before.get(k) != after.get(k)]
    return changed, "; ".join(leaves)


def _leaves(node: Any, prefix: str) -> dict[str, Any]:
    """A config node as {dotted key: leaf value}."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node)
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}.{key}").items()}
    return {prefix: node}


def _show(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.absolute().relative_to(Path.cwd().absolute()))
    except ValueError:
        return str(path)


NEXT_USE = {
    "train": "python sample.py ckpt={latest}",
    "vae": "python train.py latent=vae latent.path={latest}/vae",
}
"""How the newest run of each task is used next, printed beside the ``latest`` link (classifiers: _classifier_use)."""


def _classifier_use(cfg: DictConfig, latest: str) -> str:
    """A noise-aware classifier guides sampling; a clean one gives evaluation features."""
    if cfg.classifier.get("noise_aware", True):
        return f"sample.py classifier={latest}"
    return f"features=classifier features.path={latest}"


def _report_training(run_dir: Path, metrics: dict[str, float], cfg: DictConfig) -> None:
    lines = [f"run dir:     {_show(run_dir)}", f"checkpoint:  {_show(run_dir / 'checkpoints' / 'last.ckpt')}"]
    for label, sub in (("samples:", "samples"), ("recon grid:", "reconstructions")):
        grids = sorted((run_dir / sub).glob("step_*.png"))
        if grids:
            lines.append(f"{label:<13}{_show(grids[-1])}")
    if (run_dir / "vae" / "config.json").is_file():
        lines.append(f"vae:         {_show(run_dir / 'vae')}")
    lines += [f"{k}: {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith(("val/", "eval/"))]
    if _default_single_run():
        latest = _link_latest(run_dir)
        if latest:
            shown = _show(latest)
            use = _classifier_use(cfg, shown) if "classifier" in cfg else NEXT_USE.get(cfg.task_name, "").format(latest=shown)
            lines.append(f"latest:      {shown} -> {run_dir.name}" + (f" ({use})" if use else ""))
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


def _read_checkpoint(path: str | os.PathLike, task_name: str) -> tuple[dict[str, Any], DictConfig]:
    """A checkpoint's contents and run config, loaded with ``weights_only=True`` (no arbitrary pickles)."""
    p = resolve_checkpoint(path)
    ckpt = read_checkpoint_file(p)
    hyper_parameters = ckpt.get("hyper_parameters")
    run_config = hyper_parameters.get("run_config") if isinstance(hyper_parameters, dict) else None
    if not run_config or "state_dict" not in ckpt:
        raise ConfigError(f"{p} is not a difflab checkpoint (it has no run config or state_dict)")
    if run_config.get("task_name") != task_name:
        raise ConfigError(f"{p} is a checkpoint of a '{run_config.get('task_name')}' run, expected a '{task_name}' run")
    return ckpt, OmegaConf.create(run_config)


def load_checkpoint(path: str | os.PathLike, vae_path: str | None = None) -> DiffusionModule:
    """Rebuild a DiffusionModule from a train.py checkpoint alone (its run config travels inside it).

    A latent-space model loads its VAE from the path it was trained with, or ``vae_path`` if it moved
    (the VAE's fingerprint must match either way).
    """
    ckpt, run_config = _read_checkpoint(path, "train")
    if vae_path is not None:
        if OmegaConf.select(run_config, "latent._target_") is None:
            raise ConfigError(f"vae_path={vae_path} given, but {path} is a pixel-space model (trained with latent=none)")
        run_config.latent.path = str(vae_path)
    return _module_from(ckpt, run_config)


def _module_from(ckpt: dict[str, Any], run_config: DictConfig) -> DiffusionModule:
    module = build_module(run_config)
    module.load_state_dict(ckpt["state_dict"])
    return module


def export(cfg: DictConfig) -> dict[str, Any]:
    """Write ``cfg.ckpt``'s EMA model in diffusers' format into ``cfg.out`` (:mod:`difflab.export`); its manifest."""
    from difflab.export import export_diffusers

    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is an existing file, not a directory: give a new or empty directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"out={out} is not empty: give a new or empty directory, or set overwrite=true to replace it")
    path = resolve_checkpoint(cfg.ckpt)
    ckpt, run_config = _read_checkpoint(path, "train")
    module = _module_from(ckpt, run_config)
    class_names = list(OmegaConf.select(run_config, "conditioning.class_names", default=[]))
    source = {"checkpoint": str(path.resolve()), "global_step": int(ckpt["global_step"]), "class_names": class_names}
    manifest = export_diffusers(module, out, source)
    use = f"DDPMPipeline.from_pretrained({str(out)!r})" if manifest["ddpm_pipeline"] else (
        f"UNet2DModel.from_pretrained({str(out / 'unet')!r}) (not DDPMPipeline: "
        f"{'; '.join(manifest['ddpm_pipeline_blockers'])})")
    step = manifest["global_step"]
    print(f"exported:    {_show(out)} (step {step}, EMA weights); load with diffusers' {use}", flush=True)
    return manifest


def load_classifier(path: str | os.PathLike) -> ClassifierModule:
    """Rebuild a ClassifierModule from a train_classifier.py checkpoint."""
    ckpt, run_config = _read_checkpoint(path, "classifier")
    module = build_classifier(run_config)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sample_labels(cfg: DictConfig, num_classes: int | None, class_names: list[str], source: str) -> torch.Tensor | None:
    """The class of every sample: ``labels=all`` (balanced, the default) or a list of ids / names, cycled."""
    if not num_classes:
        if cfg.labels is not None:
            raise ConfigError(
                f"labels={cfg.labels} given, but {source} is unconditional (trained with conditioning=none): "
                "train with conditioning=class, or give a classifier= for classifier guidance"
            )
        return None
    if cfg.labels is None or cfg.labels == "all":
        return balanced_labels(num_classes, cfg.num_samples)
    requested = list(cfg.labels) if OmegaConf.is_list(cfg.labels) else [cfg.labels]
    ids = []
    for label in requested:
        if isinstance(label, str) and label in class_names:
            ids.append(class_names.index(label))
        elif isinstance(label, int) and 0 <= label < num_classes:
            ids.append(label)
        else:
            allowed = f"class ids in [0, {num_classes})" + (f" or names {class_names}" if class_names else "")
            raise ConfigError(f"label {label!r} is not a class of this model: allowed are {allowed}, or labels=all")
    return torch.tensor(ids)[torch.arange(cfg.num_samples) % len(ids)]


def _check_counts(cfg: DictConfig, *keys: str) -> None:
    """Refuse a ``cfg`` count (num_samples, batch_size, ...) that is not a positive integer."""
    for key in keys:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {value}")


def _out_dir(cfg: DictConfig, names: tuple[str, ...]) -> Path:
    """``cfg.out_dir`` (default: the run dir); refused if it is a file, or holds one of ``names`` and not overwrite."""
    out_dir = Path(cfg.out_dir or cfg.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir={out_dir} is an existing file, not a directory: give a new or existing directory")
    for name in names:
        if (out_dir / name).exists() and not cfg.overwrite:
            raise ConfigError(f"{out_dir / name} already exists: pick another out_dir, or set overwrite=true")
    return out_dir


@dataclass
class SamplingPlan:
    """What sample.py and evaluate.py draw: the sampler, each sample's label, ``module.generate``'s guidance."""

    sampler: Sampler
    labels: torch.Tensor | None
    num_samples: int
    guidance: dict[str, Any]
    class_names: list[str]

    def draw(self, module: DiffusionModule, cfg: DictConfig) -> torch.Tensor:
        """The plan's images (N, C, H, W) in [-1, 1] from ``cfg.seed``, ``cfg.batch_size`` at a time."""
        return module.generate(
            self.sampler, self.num_samples, cfg.seed, cfg.batch_size, labels=self.labels, progress=cfg.progress,
            **self.guidance,
        )


def _sampling_plan(cfg: DictConfig, sampler: Sampler, module: DiffusionModule, device: torch.device) -> SamplingPlan:
    """Check the guidance settings against the model (and ``cfg.classifier``) and pick the labels (:func:`sample`)."""
    module.check_sampler(sampler)
    try:
        module.check_guidance_scale(cfg.guidance_scale)
    except ValueError as err:
        raise ConfigError(f"{cfg.ckpt}: {err}") from err
    class_names = list(module.hparams["run_config"].get("conditioning", {}).get("class_names", []))
    num_classes, source = module.num_classes, f"the model {cfg.ckpt}"
    guidance = {"use_ema": cfg.use_ema, "guidance_scale": cfg.guidance_scale, "guidance_rescale": cfg.guidance_rescale}
    if cfg.classifier is not None:
        if module.latent is not None:
            raise ConfigError(
                f"classifier={cfg.classifier} cannot guide the latent-space model {cfg.ckpt}: the classifier was trained "
                "on noisy images, the model denoises latents; use classifier-free guidance (conditioning=class)"
            )
        classifier = load_classifier(cfg.classifier).to(device)
        if not classifier.noise_aware:
            raise ConfigError(
                f"classifier={cfg.classifier} was trained on clean images only (noise_aware=false: a feature network "
                "for FID / KID), so its gradients on noisy x_t mean nothing: give a train_classifier.py run "
                "(noise_aware=true, the default)"
            )
        if not torch.equal(classifier.schedule.betas.cpu(), module.schedule.betas.cpu()):
            raise ConfigError(f"classifier {cfg.classifier} was trained on another noise schedule than {cfg.ckpt}")
        k = classifier.net.head.out_features
        if num_classes and num_classes != k:
            raise ConfigError(f"classifier {cfg.classifier} has {k} classes, the model {num_classes}")
        num_classes = k
        class_names = class_names or list(classifier.hparams["run_config"].get("class_names", []))
        guidance |= {"classifier": classifier.net, "classifier_scale": cfg.classifier_scale}
    labels = _sample_labels(cfg, num_classes, class_names, source)
    num_samples = cfg.num_samples if labels is None else len(labels)
    return SamplingPlan(sampler, labels, num_samples, guidance, class_names)


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Sample ``cfg.num_samples`` images from ``cfg.ckpt``; writes samples.npz (arr_0: uint8 NHWC, arr_1: labels) and grid.png."""
    _check_counts(cfg, "num_samples", "batch_size")
    out_dir = _out_dir(cfg, ("samples.npz", "grid.png"))
    sampler = _instantiate(cfg.sampler, "sampler")
    device = _device(cfg.device)
    module = load_checkpoint(cfg.ckpt, cfg.get("vae_path")).to(device)
    plan = _sampling_plan(cfg, sampler, module, device)
    if plan.class_names:
        print(f"classes:     {dict(enumerate(plan.class_names))}", flush=True)
    images = to_uint8(plan.draw(module, cfg))
    labels = plan.labels
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels.numpy()}
    np.savez(out_dir / "samples.npz", **arrays)
    grid = save_grid(images, out_dir / "grid.png", scale=cfg.grid_scale, labels=None if labels is None else labels.numpy())
    print(f"samples:     {_show(out_dir / 'samples.npz')} {images.shape} {images.dtype}\ngrid:        {_show(grid)}", flush=True)
    return {"samples": out_dir / "samples.npz", "grid": grid, "images": images, "labels": labels}


EVALUATION_METRICS = ("fid", "kid", "nll")
RESULTS_SCHEMA = 1
"""The version of results.json (its schema is in :mod:`difflab.summarize`)."""


def _metric_names(value: Any) -> list[str]:
    """The asked-for metrics (``metrics=[fid,kid,nll]``, or one name), in EVALUATION_METRICS order."""
    names = [value] if isinstance(value, str) else list(value or [])
    unknown = [name for name in names if name not in EVALUATION_METRICS]
    if unknown or not names:
        raise ConfigError(
            f"metrics={names} has {'unknown ' + ', '.join(map(str, unknown)) if unknown else 'no metric'}: "
            f"allowed are {', '.join(EVALUATION_METRICS)} (e.g. metrics=[fid,kid,nll])"
        )
    return [name for name in EVALUATION_METRICS if name in names]


def _choice(group: str, fallback: str) -> str:
    """The option of config group ``group`` this Hydra job composed (``sampler=ddim``: ddim); else ``fallback``."""
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get(group) or fallback)
    return fallback


def _check_evaluation(cfg: DictConfig, metrics: list[str]) -> None:
    """Refuse bad evaluate.py settings that need no checkpoint to judge."""
    _check_counts(cfg, "num_samples", "batch_size")
    if {"fid", "kid"} & set(metrics):
        if cfg.num_samples < 2:
            raise ConfigError(f"fid and kid need num_samples >= 2, got {cfg.num_samples}")
        _check_counts(cfg, "kid_subsets", "kid_subset_size")
        if cfg.reference_split not in SPLITS:
            raise ConfigError(f"reference_split={cfg.reference_split} is not one of {', '.join(SPLITS)}")
    if "nll" in metrics:
        for key in ("timesteps", "num_images"):
            if cfg.nll[key] is not None:
                _check_counts(cfg.nll, key)
        if cfg.nll.split not in SPLITS:
            raise ConfigError(f"nll.split={cfg.nll.split} is not one of {', '.join(SPLITS)} (val: the held-out images)")


def _nll_images(cfg: DictConfig, datamodule: Any, module: DiffusionModule) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images (and, for a class-conditional model, labels) whose bits/dim evaluate.py reports."""
    images, labels = datamodule.split(cfg.nll.split)
    if images.shape[0] == 0:
        raise ConfigError(
            f"nll.split={cfg.nll.split} holds no images (dataset.val_fraction={datamodule.val_fraction}): "
            "use nll.split=train"
        )
    count = cfg.nll.num_images or images.shape[0]
    return images[:count], labels[:count] if module.num_classes else None


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """FID / KID of samples and the NLL bound in bits/dim of ``cfg.ckpt``; writes ``<out_dir>/results.json``.

    Only what ``cfg.metrics`` asks for is computed: sampling for fid / kid, the bound for nll
    (:mod:`difflab.likelihood`, on the checkpoint's held-out split). Every setting is checked
    before any of them starts. Returns the results (``summarize``'s schema).
    """
    metrics = _metric_names(cfg.metrics)
    quality = bool({"fid", "kid"} & set(metrics))
    _check_evaluation(cfg, metrics)
    out_dir = _out_dir(cfg, (RESULTS_FILE,))
    sampler = _instantiate(cfg.sampler, "sampler")
    device = _device(cfg.device)
    ckpt = resolve_checkpoint(cfg.ckpt)
    module = load_checkpoint(ckpt, cfg.get("vae_path")).to(device)
    datamodule = instantiate(module.hparams["run_config"]["dataset"])  # the data the model was trained on
    num_timesteps = module.schedule.num_timesteps
    plan, features = None, None
    if quality:
        plan = _sampling_plan(cfg, sampler, module, device)
        features = _instantiate(cfg.features, "features")
        try:
            features.check_images(module.net.sample_shape)
        except ValueError as err:
            raise ConfigError(
                f"features={_choice('features', type(features).__name__)} cannot embed the images of {ckpt} "
                f"(shape {module.net.sample_shape}): {err}"
            ) from err
        features.to(device)
    if "nll" in metrics:
        check_supported(module)
        nll_sampler(module, sampler)
        if cfg.nll.timesteps is not None and cfg.nll.timesteps > num_timesteps - 1:
            raise ConfigError(
                f"nll.timesteps={cfg.nll.timesteps} exceeds the model's T - 1 = {num_timesteps - 1} KL terms: "
                "give fewer, or nll.timesteps=null for all of them (exact)"
            )
        nll_images, nll_labels = _nll_images(cfg, datamodule, module)

    results: dict[str, Any] = {
        "schema": RESULTS_SCHEMA,
        "ckpt": str(ckpt),
        "sampler": {
            "name": _choice("sampler", type(sampler).__name__.lower()),
            **{k: v for k, v in OmegaConf.to_container(cfg.sampler, resolve=True).items() if k != "_target_"},
        },
        "num_steps": sampler.num_steps or num_timesteps,
        "guidance_scale": cfg.guidance_scale,
        "num_samples": plan.num_samples if plan else None,
        "seed": cfg.seed,
        "use_ema": cfg.use_ema,
        "features": {"name": _choice("features", type(features).__name__), "fingerprint": features.fingerprint}
        if features else None,
        "metrics": {},
        "seconds": None,
        "seconds_per_image": None,
    }
    lines = [f"checkpoint:  {_show(ckpt)}"]
    if plan is not None:
        started = time.perf_counter()
        images = plan.draw(module, cfg)
        seconds = time.perf_counter() - started
        results |= {"seconds": seconds, "seconds_per_image": seconds / plan.num_samples}
        real = reference_images(datamodule, cfg.reference_split)
        source = {**dataset_description(datamodule), "split": cfg.reference_split}
        reference = reference_features(real, features, source, cfg.cache_dir, cfg.batch_size)
        scores = sample_quality(
            images, reference, features, cfg.batch_size, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed
        )
        results["reference"] = {"split": cfg.reference_split, "num_images": int(real.shape[0])}
        if "fid" in metrics:
            results["metrics"]["fid"] = scores["fid"]
        if "kid" in metrics:
            results["metrics"] |= {k: scores[k] for k in ("kid_mean", "kid_std", "kid_subset_size")}
        lines.append(
            f"sampled:     {plan.num_samples} images, {results['sampler']['name']} {results['num_steps']} steps, "
            f"{seconds:.1f} s ({seconds / plan.num_samples:.4f} s/image)"
        )
        name, split = results["features"]["name"], cfg.reference_split
        against = f"({name} features; {plan.num_samples} samples vs {real.shape[0]} {split} images)"
        if "fid" in metrics:
            lines.append(f"FID:         {scores['fid']:.6g}  {against}")
        if "kid" in metrics:
            lines.append(
                f"KID:         {scores['kid_mean']:.6g} +- {scores['kid_std']:.3g}  (subsets of {scores['kid_subset_size']})"
            )
    if "nll" in metrics:
        started = time.perf_counter()
        terms = bits_per_dim(
            module, nll_images, nll_labels, sampler, cfg.nll.timesteps, cfg.seed, cfg.batch_size, cfg.use_ema
        )
        seconds = time.perf_counter() - started
        summary = terms.summary()
        results["metrics"] |= summary
        k = len(terms.bounds)
        results["nll"] = {
            "split": cfg.nll.split,
            "num_images": int(nll_images.shape[0]),
            "labels": "true labels (p(x | y), no guidance)" if nll_labels is not None else None,
            "data": "rounded to the 8-bit grid (256 levels per channel)",
            "estimator": "exact" if terms.exact else "stratified",
            "timesteps": k,
            "evaluations_per_image": k + 1,
            "variance": variance_name(module, nll_sampler(module, sampler)),
            "use_ema": cfg.use_ema,
            "seed": cfg.seed,
            "seconds": seconds,
            "terms_timesteps": [[0, 1], *[list(b) for b in terms.bounds]],
            "terms_bpd": [float(terms.decoder.double().mean()), *terms.strata.double().mean(0).tolist()],
        }
        lines.append(
            f"bits/dim:    {summary['nll_bpd']:.4f} +- {summary['nll_bpd_stderr']:.4f}  "
            f"(L_T {summary['nll_prior_bpd']:.4f} + KL terms {summary['nll_kl_bpd']:.4f} + L_0 "
            f"{summary['nll_decoder_bpd']:.4f}; {nll_images.shape[0]} {cfg.nll.split} images, "
            f"{'all' if terms.exact else k} + 1 timesteps each, {results['nll']['variance']} variance)"
        )
    path = atomic_write(out_dir / RESULTS_FILE, lambda f: f.write(json.dumps(results, indent=2).encode()))
    lines.append(f"results:     {_show(path)}")
    print("\n".join(lines), flush=True)
    return results
