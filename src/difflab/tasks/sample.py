"""sample.py: draw images from a checkpoint, with classifier-free or classifier guidance; samples.npz and grid.png."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from difflab.build import instantiate_node, load_checkpoint, load_classifier
from difflab.errors import ConfigError
from difflab.guidance import balanced_labels
from difflab.images import save_grid, to_uint8
from difflab.module import DiffusionModule
from difflab.samplers import Sampler
from difflab.tasks.checks import check_sampling_settings
from difflab.tasks.common import check_counts, checked_out_dir, pick_device, show


@dataclass
class SamplingPlan:
    """What sample.py and evaluate.py draw: the sampler, each sample's label, ``module.generate``'s guidance."""

    sampler: Sampler
    labels: torch.Tensor | None
    num_samples: int
    guidance: dict[str, Any]
    class_names: list[str]

    batch_size: int = 64
    prompts: list[str] | None = None
    """A text model's prompt of every sample (its labels are their token ids (N, L))."""

    def draw(self, module: DiffusionModule, cfg: DictConfig) -> torch.Tensor:
        """The plan's images (N, C, H, W) in [-1, 1] from ``cfg.seed``, ``batch_size`` at a time."""
        return module.generate(
            self.sampler, self.num_samples, cfg.seed, self.batch_size, labels=self.labels, progress=cfg.progress,
            **self.guidance,
        )


def sampling_plan(
    cfg: DictConfig, sampler: Sampler, module: DiffusionModule, device: torch.device, prompts: list[str] | None = None
) -> SamplingPlan:
    """Check the guidance settings against the model (and ``cfg.classifier``) and pick the labels (:func:`sample`);
    a text model's prompts: ``prompts``, else ``cfg.prompt`` / ``cfg.prompts``, else its training grids' prompts."""
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
    prompts = sample_prompts(cfg, module, source, prompts)
    if prompts is not None:
        if cfg.classifier is not None:
            raise ConfigError(f"classifier={cfg.classifier} cannot guide the text model {cfg.ckpt}: use guidance_scale")
        if cfg.labels is not None:
            raise ConfigError(f"labels={cfg.labels} given, but {source} is a text model: give prompts=[...] instead")
        labels = module.conditioning.token_ids(prompts, strict=True)
        guidance["null"] = module.conditioning.null_condition(cfg.get("negative_prompt") or "")
    else:
        labels = sample_labels(cfg, num_classes, class_names, source)
    num_samples = cfg.num_samples if labels is None else len(labels)
    guidance["precision"] = cfg.get("precision", "fp32")
    net = module.ema.module if cfg.use_ema else module.net
    if cfg.get("channels_last"):
        net.to(memory_format=torch.channels_last)
    if cfg.get("compile") and getattr(net.unet, "_compiled_call_impl", None) is None:
        net.unet.compile()  # in place: a minute of compiling on the first batch (and for a smaller last one)
    batch_size = cfg.batch_size
    if batch_size == "auto":
        batch_size = auto_batch_size(module, net, num_samples, device)
        print(f"batch size:  {batch_size} (batch_size=auto)", flush=True)
    return SamplingPlan(sampler, labels, num_samples, guidance, class_names, batch_size, prompts)


def sample_prompts(
    cfg: DictConfig, module: DiffusionModule, source: str, prompts: list[str] | None = None
) -> list[str] | None:
    """Every sample's prompt for a text model (``prompts``, ``cfg.prompt`` or ``cfg.prompts``, cycled to
    ``cfg.num_samples``; default: the model's training grid prompts); None for other models."""
    given = prompts
    if given is None and cfg.get("prompt") is not None:
        given = [cfg.prompt]
    elif given is None and cfg.get("prompts") is not None:
        given = list(cfg.prompts) if OmegaConf.is_list(cfg.prompts) else [cfg.prompts]
        if not given:
            raise ConfigError("prompts=[] is empty: give at least one prompt, e.g. 'prompts=[a handwritten seven]'")
    if cfg.get("prompt") is not None and cfg.get("prompts") is not None:
        raise ConfigError(f"give prompt={cfg.prompt!r} or prompts={list(cfg.prompts)}, not both")
    text = hasattr(module.conditioning, "token_ids")
    if not text:
        if given is not None or cfg.get("negative_prompt") is not None:
            what = "negative_prompt" if given is None else "prompt"
            raise ConfigError(
                f"a {what} was given, but {source} was not trained on text (conditioning="
                f"{'class' if module.num_classes else 'none'}): train with conditioning=text to sample from prompts"
            )
        return None
    given = given or list(module.conditioning.sample_prompts)
    if any(not isinstance(p, str) for p in given):
        raise ConfigError(f"prompts must be strings, got {given}")
    return [given[i % len(given)] for i in range(cfg.num_samples)]


AUTO_CPU_BATCH = 256
"""batch_size=auto on a CPU: larger batches only cost memory there."""


def auto_batch_size(module: DiffusionModule, net: Any, num_samples: int, device: torch.device) -> int:
    """The largest power-of-two batch (at most ``num_samples``) whose network evaluation fits in the CUDA device's
    memory, found by trying doubling batches (a network call uses the most memory of a sampling step); on a CPU
    min(num_samples, AUTO_CPU_BATCH). Samples do not depend on the batch size (their noise is per sample)."""
    if device.type != "cuda":
        return min(num_samples, AUTO_CPU_BATCH)
    shape, fits = net.sample_shape, 1
    in_channels = net.unet.config.in_channels
    while fits < num_samples:
        trial = min(2 * fits, num_samples)
        try:
            with torch.no_grad():
                x = torch.zeros(trial, in_channels, *shape[1:], device=device)
                y = torch.zeros(trial, dtype=torch.long, device=device) if module.num_classes else None
                if net.text_encoder is not None:
                    y = torch.zeros(trial, module.conditioning.max_length, dtype=torch.long, device=device)
                net(x, torch.zeros(trial, dtype=torch.long, device=device), y)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        fits = trial
    return fits


def sample_labels(cfg: DictConfig, num_classes: int | None, class_names: list[str], source: str) -> torch.Tensor | None:
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


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Sample ``cfg.num_samples`` images from ``cfg.ckpt``; writes samples.npz (arr_0: uint8 NHWC, arr_1: labels; a
    text model's ``prompts``: one str per sample) and grid.png (a row per class or prompt)."""
    check_sampling_settings(cfg)
    check_counts(cfg, "num_samples", *(() if cfg.batch_size == "auto" else ("batch_size",)))
    out_dir = checked_out_dir(cfg, ("samples.npz", "grid.png"))
    sampler = instantiate_node(cfg.sampler, "sampler")
    device = pick_device(cfg.device)
    module = load_checkpoint(cfg.ckpt, cfg.get("vae_path")).to(device)
    plan = sampling_plan(cfg, sampler, module, device)
    if plan.class_names:
        print(f"classes:     {dict(enumerate(plan.class_names))}", flush=True)
    images = to_uint8(plan.draw(module, cfg))
    labels = plan.labels
    out_dir.mkdir(parents=True, exist_ok=True)
    if plan.prompts is not None:  # one row per prompt, in the order given
        order = list(dict.fromkeys(plan.prompts))
        rows = np.array([order.index(p) for p in plan.prompts])
        arrays = {"arr_0": images, "prompts": np.array(plan.prompts)}
    else:
        rows = None if labels is None else labels.numpy()
        arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels.numpy()}
    np.savez(out_dir / "samples.npz", **arrays)
    grid = save_grid(images, out_dir / "grid.png", scale=cfg.grid_scale, labels=rows)
    print(f"samples:     {show(out_dir / 'samples.npz')} {images.shape} {images.dtype}\ngrid:        {show(grid)}", flush=True)
    return {"samples": out_dir / "samples.npz", "grid": grid, "images": images, "labels": labels, "prompts": plan.prompts}
