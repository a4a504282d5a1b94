"""export.py: a checkpoint's EMA model in diffusers' format (:mod:`difflab.export`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from difflab.build import module_from_checkpoint, read_checkpoint, resolve_checkpoint
from difflab.errors import ConfigError
from difflab.export import export_diffusers
from difflab.tasks.common import show


def export(cfg: DictConfig) -> dict[str, Any]:
    """Write ``cfg.ckpt``'s EMA model in diffusers' format into ``cfg.out`` (:mod:`difflab.export`); its manifest."""
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is an existing file, not a directory: give a new or empty directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"out={out} is not empty: give a new or empty directory, or set overwrite=true to replace it")
    path = resolve_checkpoint(cfg.ckpt)
    ckpt, run_config = read_checkpoint(path, "train")
    module = module_from_checkpoint(ckpt, run_config)
    class_names = list(OmegaConf.select(run_config, "conditioning.class_names", default=[]))
    source = {"checkpoint": str(path.resolve()), "global_step": int(ckpt["global_step"]), "class_names": class_names}
    manifest = export_diffusers(module, out, source)
    if manifest["pipeline"] == "StableDiffusionPipeline":
        use = f"StableDiffusionPipeline.from_pretrained({str(out)!r}, safety_checker=None)"
    elif manifest["pipeline"] == "DDPMPipeline":
        use = f"DDPMPipeline.from_pretrained({str(out)!r})"
    elif "stable_diffusion_pipeline_blockers" in manifest:
        use = (f"UNet2DConditionModel.from_pretrained({str(out / 'unet')!r}) and CLIPTextModel.from_pretrained("
               f"{str(out / 'text_encoder')!r}) (not StableDiffusionPipeline: "
               f"{'; '.join(manifest['stable_diffusion_pipeline_blockers'])})")
    else:
        use = (f"UNet2DModel.from_pretrained({str(out / 'unet')!r}) (not DDPMPipeline: "
               f"{'; '.join(manifest['ddpm_pipeline_blockers'])})")
    step = manifest["global_step"]
    print(f"exported:    {show(out)} (step {step}, EMA weights); load with diffusers' {use}", flush=True)
    return manifest
