"""evaluate.py: FID / KID of a checkpoint's samples and its NLL bound in bits/dim, into results.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from difflab.build import instantiate_node, load_checkpoint, resolve_checkpoint
from difflab.checkpointing import atomic_write
from difflab.data.base import SPLITS
from difflab.errors import ConfigError
from difflab.likelihood import bits_per_dim, check_supported, nll_sampler, variance_name
from difflab.metrics import (
    ClassifierFeatures,
    ReferenceCache,
    classifier_accuracy,
    dataset_description,
    reference_features,
    reference_images,
    sample_quality,
)
from difflab.module import DiffusionModule
from difflab.summarize import RESULTS_FILE
from difflab.tasks.checks import check_cache_dir, check_sampling_settings
from difflab.tasks.common import check_counts, checked_out_dir, group_choice, pick_device, show
from difflab.tasks.feature_classifier import resolved_features
from difflab.tasks.sample import sampling_plan
from difflab.tasks.train import train_classifier


EVALUATION_METRICS = ("fid", "kid", "nll")


RESULTS_SCHEMA = 1
"""The version of results.json (its schema is in :mod:`difflab.summarize`)."""


def metric_names(value: Any) -> list[str]:
    """The asked-for metrics (``metrics=[fid,kid,nll]``, or one name), in EVALUATION_METRICS order."""
    names = [value] if isinstance(value, str) else list(value or [])
    unknown = [name for name in names if name not in EVALUATION_METRICS]
    if unknown or not names:
        raise ConfigError(
            f"metrics={names} has {'unknown ' + ', '.join(map(str, unknown)) if unknown else 'no metric'}: "
            f"allowed are {', '.join(EVALUATION_METRICS)} (e.g. metrics=[fid,kid,nll])"
        )
    return [name for name in EVALUATION_METRICS if name in names]


def check_evaluation(cfg: DictConfig, metrics: list[str]) -> None:
    """Refuse bad evaluate.py settings that need no checkpoint to judge."""
    check_counts(cfg, "num_samples", "batch_size")
    check_sampling_settings(cfg)
    if {"fid", "kid"} & set(metrics):
        check_cache_dir(ReferenceCache(cfg.cache_dir).dir, "cache_dir=DIR")
        if cfg.num_samples < 2:
            raise ConfigError(f"fid and kid need num_samples >= 2, got {cfg.num_samples}")
        check_counts(cfg, "kid_subsets", "kid_subset_size")
        if cfg.reference_split not in SPLITS:
            raise ConfigError(f"reference_split={cfg.reference_split} is not one of {', '.join(SPLITS)}")
    if "nll" in metrics:
        for key in ("timesteps", "num_images"):
            if cfg.nll[key] is not None:
                check_counts(cfg.nll, key)
        if cfg.nll.split not in SPLITS:
            raise ConfigError(f"nll.split={cfg.nll.split} is not one of {', '.join(SPLITS)} (val: the held-out images)")


def nll_data(cfg: DictConfig, datamodule: Any, module: DiffusionModule) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images (and, for a class-conditional model, labels) whose bits/dim evaluate.py reports."""
    images, labels = datamodule.split(cfg.nll.split)
    if images.shape[0] == 0:
        raise ConfigError(
            f"nll.split={cfg.nll.split} holds no images (dataset.val_fraction={datamodule.val_fraction}): "
            "use nll.split=train"
        )
    count = cfg.nll.num_images or images.shape[0]
    return images[:count], labels[:count] if module.num_classes else None


def held_out_captions(datamodule: Any, module: DiffusionModule) -> tuple[list[str], torch.Tensor] | None:
    """A text model's prompts for FID / KID: the captions of its held-out split (of the training split if none is
    held out), cycled by the sampling plan, with their images' labels (N,); None for other models."""
    if not hasattr(module.conditioning, "token_ids"):
        return None
    datamodule.setup("fit")
    split = datamodule.val_set if datamodule.val_set.captions else datamodule.train_set
    return list(split.captions), split.labels


def prompt_labels(
    captions: tuple[list[str], torch.Tensor] | None, datamodule: Any, features: Any, num_samples: int
) -> torch.Tensor | None:
    """The class each sample's prompt names (N,): the label of the image the caption came from, where the data has
    classes and the feature classifier was trained on those classes; None where prompt following is not scored."""
    if captions is None or len(datamodule.class_names) < 2 or not isinstance(features, ClassifierFeatures):
        return None
    if features.class_names != list(datamodule.class_names):
        return None
    labels = captions[1]
    return labels[torch.arange(num_samples) % len(labels)]


def evaluate(cfg: DictConfig, results_path: Path | None = None) -> dict[str, Any]:
    """FID / KID of samples and the NLL bound in bits/dim of ``cfg.ckpt``; writes ``<out_dir>/results.json``
    (or ``results_path``, given: the watcher's ``<run>/eval/step_XXXXXX.json``).

    Only what ``cfg.metrics`` asks for is computed: sampling for fid / kid, the bound for nll
    (:mod:`difflab.likelihood`, on the checkpoint's held-out split); a text model's fid / kid samples are prompted
    by the held-out captions, and on classed data scored for prompt following too (``prompt_accuracy``). Every
    setting is checked before any of them starts. Returns the results (``summarize``'s schema).
    """
    metrics = metric_names(cfg.metrics)
    quality = bool({"fid", "kid"} & set(metrics))
    check_evaluation(cfg, metrics)
    if cfg.get("ckpt") is None:
        raise ConfigError(
            "ckpt is not set: give ckpt=PATH (a .ckpt file, or a training run dir for its last.ckpt), "
            "or watch=RUN_DIR to score a training run's checkpoints as they are written"
        )
    if results_path is None:
        results_path = checked_out_dir(cfg, (RESULTS_FILE,)) / RESULTS_FILE
    sampler = instantiate_node(cfg.sampler, "sampler")
    device = pick_device(cfg.device)
    ckpt = resolve_checkpoint(cfg.ckpt)
    module = load_checkpoint(ckpt, cfg.get("vae_path")).to(device)
    datamodule_config = module.hparams["run_config"]["dataset"]  # the data it was trained on
    datamodule = instantiate_node(datamodule_config, "dataset")
    num_timesteps = module.schedule.num_timesteps
    plan, features, named = None, None, None
    if quality:
        captions = held_out_captions(datamodule, module)
        plan = sampling_plan(cfg, sampler, module, device, None if captions is None else captions[0])
        overrides = list(cfg.get("feature_classifier_overrides") or [])
        features = resolved_features(cfg.features, datamodule_config, overrides, train_classifier)
        features = instantiate_node(features, "features")
        try:
            features.check_images(module.net.sample_shape)
        except ValueError as err:
            raise ConfigError(
                f"features={group_choice('features', type(features).__name__)} cannot embed the images of {ckpt} "
                f"(shape {module.net.sample_shape}): {err}"
            ) from err
        features.to(device)
        named = prompt_labels(captions, datamodule, features, plan.num_samples)
    if "nll" in metrics:
        check_supported(module)
        nll_sampler(module, sampler)
        if cfg.nll.timesteps is not None and cfg.nll.timesteps > num_timesteps - 1:
            raise ConfigError(
                f"nll.timesteps={cfg.nll.timesteps} exceeds the model's T - 1 = {num_timesteps - 1} KL terms: "
                "give fewer, or nll.timesteps=null for all of them (exact)"
            )
        nll_images, nll_labels = nll_data(cfg, datamodule, module)

    results: dict[str, Any] = {
        "schema": RESULTS_SCHEMA,
        "ckpt": str(ckpt),
        "sampler": {
            "name": group_choice("sampler", type(sampler).__name__.lower()),
            **{k: v for k, v in OmegaConf.to_container(cfg.sampler, resolve=True).items() if k != "_target_"},
        },
        "num_steps": sampler.num_steps or num_timesteps,
        "guidance_scale": cfg.guidance_scale,
        "num_samples": plan.num_samples if plan else None,
        "seed": cfg.seed,
        "use_ema": cfg.use_ema,
        "features": {"name": group_choice("features", type(features).__name__), "fingerprint": features.fingerprint}
        if features else None,
        "metrics": {},
        "seconds": None,
        "seconds_per_image": None,
    }
    lines = [f"checkpoint:  {show(ckpt)}"]
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
        if named is not None:
            results["metrics"]["prompt_accuracy"] = classifier_accuracy(features, images, named, cfg.batch_size)
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
        if named is not None:
            lines.append(
                f"prompts:     prompt_accuracy {results['metrics']['prompt_accuracy']:.4f}  (the feature classifier "
                "reads the class the prompt names; prompts: the held-out captions)"
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
    path = atomic_write(results_path, lambda f: f.write(json.dumps(results, indent=2).encode()))
    lines.append(f"results:     {show(path)}")
    print("\n".join(lines), flush=True)
    return results
