"""A trained model in diffusers' format: the EMA UNet, a DDPMScheduler of its betas, and what diffusers cannot know."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
from diffusers import DDPMPipeline, DDPMScheduler

from difflab.module import DiffusionModule
from difflab.samplers.zoo import PREDICTION_TYPES, diffusers_betas

MANIFEST = "difflab.json"


def ddpm_scheduler(module: DiffusionModule) -> DDPMScheduler:
    """diffusers' DDPMScheduler of the module's process: its betas, objective and reverse variance, no clipping.

    The variance is beta~ (``fixed_small``, difflab's DDPM default), or the learned interpolation between
    log beta and log beta~ (``learned_range``) for a model that learns it; timesteps are ``trailing``,
    as difflab's samplers default to.
    """
    return DDPMScheduler(
        num_train_timesteps=module.schedule.num_timesteps,
        trained_betas=diffusers_betas(module.schedule.alphas_cumprod).cpu().numpy(),
        prediction_type=PREDICTION_TYPES[module.objective],
        variance_type="learned_range" if module.net.learn_variance else "fixed_small",
        clip_sample=False,
        timestep_spacing="trailing",
    )


def pipeline_blockers(module: DiffusionModule) -> list[str]:
    """Why ``DDPMPipeline`` cannot sample this model (it calls ``unet(x_t, t)`` on C channels); empty if it can."""
    reasons = []
    if module.num_classes:
        reasons.append(f"class-conditional ({module.num_classes} classes + null label {module.null_label})")
    if module.net.self_condition:
        reasons.append("self-conditioned (the UNet also takes its previous x0 estimate)")
    if module.latent is not None:
        reasons.append("latent-space (samples are decoded by vae/ after dividing by difflab.json's scaling_factor)")
    if not module.noise.is_identity:
        reasons.append(f"shaped noise ({module.noise.option}: samples live in whitened coordinates, see noise.safetensors)")
    return reasons


def export_diffusers(module: DiffusionModule, out: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """Write ``out/unet`` (the EMA UNet, safetensors), ``out/scheduler`` and ``out/difflab.json``, plus
    ``out/model_index.json`` when ``DDPMPipeline.from_pretrained(out)`` can sample the model. Returns the manifest.

    What else the model needs travels with it: ``out/vae`` (the frozen AutoencoderKL of a latent-space
    model, diffusers' format) and ``out/noise.safetensors`` (the fitted statistics of shaped noise).
    """
    unet, scheduler = module.ema.module.unet, ddpm_scheduler(module)
    blockers = pipeline_blockers(module)
    if blockers:
        unet.save_pretrained(out / "unet", safe_serialization=True)
        scheduler.save_pretrained(out / "scheduler")
    else:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    extras: dict[str, Any] = {}
    if module.latent is not None:
        module.latent.vae.save_pretrained(out / "vae", safe_serialization=True)
        extras["latent"] = {**module.latent.summary(), "path": "vae"}
    if not module.noise.is_identity:
        module.noise.save(out / "noise.safetensors")
        extras["noise"] = {"name": module.noise.name, "file": "noise.safetensors", **module.noise.config()}
    c, h, w = module.net.sample_shape
    manifest = {
        "format": "difflab export 1",
        "diffusers_version": diffusers.__version__,
        "weights": "EMA",
        "objective": module.objective,
        "prediction_type": scheduler.config.prediction_type,
        "learn_variance": module.net.learn_variance,
        "self_condition": module.net.self_condition,
        "num_classes": module.num_classes,
        "null_label": module.null_label,
        "p_uncond": module.p_uncond,
        "sample_shape": [c, h, w],
        "data_range": [-1.0, 1.0],
        "ddpm_pipeline": not blockers,
        "ddpm_pipeline_blockers": blockers,
        **extras,
        **provenance,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
