"""A trained model in diffusers' format: the EMA UNet, a scheduler of its betas, and what diffusers cannot know.

An unconditional pixel model loads as a ``DDPMPipeline``; a text model (``conditioning=text``) in latent space as a
``StableDiffusionPipeline`` (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler

from difflab.module import DiffusionModule
from difflab.samplers.zoo import PREDICTION_TYPES, diffusers_betas

MANIFEST = "difflab.json"


def scheduler_config(module: DiffusionModule) -> dict[str, Any]:
    """What every exported scheduler shares: the module's betas and objective, no clipping, ``trailing`` timesteps
    (as difflab's samplers default to)."""
    return {
        "num_train_timesteps": module.schedule.num_timesteps,
        "trained_betas": diffusers_betas(module.schedule.alphas_cumprod).cpu().numpy(),
        "prediction_type": PREDICTION_TYPES[module.objective],
        "clip_sample": False,
        "timestep_spacing": "trailing",
    }


def ddpm_scheduler(module: DiffusionModule) -> DDPMScheduler:
    """diffusers' DDPMScheduler of the module's process (:func:`scheduler_config`).

    The variance is beta~ (``fixed_small``, difflab's DDPM default), or the learned interpolation between
    log beta and log beta~ (``learned_range``) for a model that learns it.
    """
    return DDPMScheduler(
        variance_type="learned_range" if module.net.learn_variance else "fixed_small", **scheduler_config(module)
    )


def ddim_scheduler(module: DiffusionModule) -> DDIMScheduler:
    """diffusers' DDIMScheduler of the module's process (:func:`scheduler_config`): x_{t'} = sqrt(abar_{t'}) x0_hat
    + sqrt(1 - abar_{t'}) eps_hat at eta = 0 (the pipeline's default), the last step to abar = 1.

    Its steps are difflab's ``sampler=ddim sampler.spacing=trailing`` when the step count divides T (diffusers takes
    t' = t - T // steps, difflab the next grid timestep). ``steps_offset=1`` only because StableDiffusionPipeline
    rewrites any other value to 1 with a deprecation warning; ``trailing`` spacing does not use it.
    """
    return DDIMScheduler(set_alpha_to_one=True, steps_offset=1, **scheduler_config(module))


def network_blockers(module: DiffusionModule) -> list[str]:
    """What no diffusers pipeline samples: a UNet that also takes its previous x0 estimate, and shaped noise."""
    reasons = []
    if module.net.self_condition:
        reasons.append("self-conditioned (the UNet also takes its previous x0 estimate)")
    if not module.noise.is_identity:
        reasons.append(
            f"shaped noise ({module.noise.option}: samples live in whitened coordinates, see noise.safetensors)"
        )
    return reasons


def pipeline_blockers(module: DiffusionModule) -> list[str]:
    """Why ``DDPMPipeline`` cannot sample this model (it calls ``unet(x_t, t)`` on C channels); empty if it can."""
    reasons = []
    if module.num_classes:
        reasons.append(f"class-conditional ({module.num_classes} classes + null label {module.null_label})")
    if module.net.text_encoder is not None:
        reasons.append("text-conditional (see stable_diffusion_pipeline_blockers)")
    if module.latent is not None:
        reasons.append("latent-space (samples are decoded by vae/ after dividing by difflab.json's scaling_factor)")
    return reasons + network_blockers(module)


def stable_diffusion_blockers(module: DiffusionModule) -> list[str]:
    """Why ``StableDiffusionPipeline`` cannot sample this text model (it steps ``unet(x_t, t, text_encoder(ids))``
    on C channels with a scheduler and decodes through ``vae/``); empty if it can."""
    reasons = []
    if module.latent is None:
        reasons.append("pixel-space (StableDiffusionPipeline decodes every sample with vae/: train with latent=vae)")
    if module.net.learn_variance:
        reasons.append("learned variance (the UNet's 2C output channels: the pipeline's schedulers step on C)")
    return reasons + network_blockers(module)


def set_vae_scaling_factor(vae_dir: Path, scaling_factor: float) -> None:
    """Write difflab's latent scale s into ``vae_dir/config.json``: diffusers' pipelines decode D(x0 /
    vae.config.scaling_factor), difflab D(x0 / s), and s may be estimated from the data rather than the VAE's own.
    (The saved config is edited rather than the loaded VAE's, which the module keeps using.)"""
    path = vae_dir / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "scaling_factor": scaling_factor}, indent=2, sort_keys=True) + "\n")


PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
"""transformers 5 saves a PreTrainedTokenizerFast (the scratch encoder's) under the name of its base class
TokenizersBackend, which transformers 4 (difflab takes >= 4.40) lacks; both have PreTrainedTokenizerFast (in 5 the
same class), so the export names that."""


def name_tokenizer_portably(out: Path) -> None:
    """Rename the tokenizer's class in ``out/tokenizer/tokenizer_config.json`` and ``out/model_index.json`` (if
    written) by :data:`PORTABLE_TOKENIZER_CLASSES`."""
    config_path, index_path = out / "tokenizer" / "tokenizer_config.json", out / "model_index.json"
    config = json.loads(config_path.read_text())
    name = config.get("tokenizer_class")
    if name not in PORTABLE_TOKENIZER_CLASSES:
        return
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASSES[name]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        index["tokenizer"] = ["transformers", PORTABLE_TOKENIZER_CLASSES[name]]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def export_diffusers(module: DiffusionModule, out: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """Write ``out/unet`` (the EMA UNet, safetensors), ``out/scheduler`` and ``out/difflab.json``, plus
    ``out/model_index.json`` when ``DDPMPipeline.from_pretrained(out)`` (unconditional models) or
    ``StableDiffusionPipeline.from_pretrained(out, safety_checker=None)`` (text models) can sample the model.
    Returns the manifest.

    What else the model needs travels with it: ``out/vae`` (the frozen AutoencoderKL of a latent-space
    model, diffusers' format, its ``scaling_factor`` difflab's), ``out/text_encoder`` and ``out/tokenizer`` (a text
    model's EMA CLIPTextModel and its transformers tokenizer) and ``out/noise.safetensors`` (the fitted statistics
    of shaped noise). A text model's scheduler is a DDIMScheduler (:func:`ddim_scheduler`), others' a DDPMScheduler.
    """
    ema = module.ema.module
    text = ema.text_encoder is not None
    parts: dict[str, Any] = {"unet": ema.unet, "scheduler": ddim_scheduler(module) if text else ddpm_scheduler(module)}
    if text:
        parts |= {"text_encoder": ema.text_encoder, "tokenizer": module.conditioning.tokenizer}
    if module.latent is not None:
        parts["vae"] = module.latent.vae
    ddpm_blockers = pipeline_blockers(module)
    blockers = stable_diffusion_blockers(module) if text else ddpm_blockers
    if blockers:
        for name, part in parts.items():
            part.save_pretrained(out / name)
    elif text:
        from diffusers import StableDiffusionPipeline  # here: it imports transformers' image models, text models only

        StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        ).save_pretrained(out)
    else:
        DDPMPipeline(**parts).save_pretrained(out)
    extras: dict[str, Any] = {}
    if module.latent is not None:
        set_vae_scaling_factor(out / "vae", float(module.latent.scaling_factor))
        extras["latent"] = {**module.latent.summary(), "path": "vae"}
    if text:
        name_tokenizer_portably(out)
        extras["text"] = {
            "text_encoder": "text_encoder", "tokenizer": "tokenizer", "max_length": module.conditioning.max_length
        }
        extras["stable_diffusion_pipeline_blockers"] = blockers
    if not module.noise.is_identity:
        module.noise.save(out / "noise.safetensors")
        extras["noise"] = {"name": module.noise.name, "file": "noise.safetensors", **module.noise.config()}
    c, h, w = module.net.sample_shape
    scheduler = parts["scheduler"]
    manifest = {
        "format": "difflab export 1",
        "diffusers_version": diffusers.__version__,
        "weights": "EMA",
        "objective": module.objective,
        "prediction_type": scheduler.config.prediction_type,
        "scheduler": type(scheduler).__name__,
        "learn_variance": module.net.learn_variance,
        "self_condition": module.net.self_condition,
        "num_classes": module.num_classes,
        "null_label": module.null_label,
        "p_uncond": module.p_uncond,
        "sample_shape": [c, h, w],
        "data_range": [-1.0, 1.0],
        "pipeline": None if blockers else ("StableDiffusionPipeline" if text else "DDPMPipeline"),
        "ddpm_pipeline": not text and not blockers,
        "ddpm_pipeline_blockers": ddpm_blockers,
        **extras,
        **provenance,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
