"""export.py writes the EMA model in diffusers' format: UNet2DModel and DDPMPipeline load it and match difflab."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from difflab.build import build_module, load_checkpoint
from difflab.export import export_diffusers
from tests.conftest import compose, run_script


@pytest.mark.slow
def test_export_loads_into_diffusers_and_matches_the_ema_network(trained_run, tmp_path):
    out = tmp_path / "exported"
    proc = run_script("export.py", f"ckpt={trained_run}", f"out={out}", cwd=tmp_path)
    use = f"DDPMPipeline.from_pretrained('{out}')"
    assert f"exported:    exported (step 6, EMA weights); load with diffusers' {use}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["difflab.json", "model_index.json", "scheduler", "unet"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # nothing else written (no Hydra dir, no log)

    module = load_checkpoint(trained_run)
    unet = UNet2DModel.from_pretrained(out / "unet")
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 500, 999])
    with torch.no_grad():
        expected = module.ema.module.unet.eval()(x, t).sample
        assert torch.equal(unet.eval()(x, t).sample, expected)  # the EMA weights, bit for bit
        assert not torch.equal(module.net.unet.eval()(x, t).sample, expected)  # (not the raw weights)

    scheduler = DDPMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.variance_type == "fixed_small"
    assert scheduler.config.clip_sample is False
    torch.testing.assert_close(scheduler.alphas_cumprod, module.schedule.alphas_cumprod.float(), rtol=1e-6, atol=0)

    manifest = json.loads((out / "difflab.json").read_text())
    assert manifest["objective"] == "v" and manifest["global_step"] == 6 and manifest["weights"] == "EMA"
    assert manifest["num_classes"] is None and manifest["sample_shape"] == [1, 8, 8] and manifest["ddpm_pipeline"]

    pipeline = DDPMPipeline.from_pretrained(out)
    images = pipeline(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1


def test_a_class_conditional_model_exports_its_unet_and_says_why_not_ddpm_pipeline(tmp_path):
    cfg = compose("train", ["model=tiny", "dataset.resolution=8", "conditioning=class", "conditioning.num_classes=3",
                            "objective=v", "output_dir=/unused"])
    module = build_module(cfg)
    manifest = export_diffusers(module, tmp_path, {"global_step": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["difflab.json", "scheduler", "unet"]  # no model_index.json
    assert manifest["num_classes"] == 3 and manifest["null_label"] == 3 and not manifest["ddpm_pipeline"]
    assert manifest["ddpm_pipeline_blockers"] == ["class-conditional (3 classes + null label 3)"]
    assert DDPMScheduler.from_pretrained(tmp_path / "scheduler").config.prediction_type == "v_prediction"
    unet = UNet2DModel.from_pretrained(tmp_path / "unet")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 3])
    with torch.no_grad():
        expected = module.ema.module.unet.eval()(x, t, class_labels=y).sample
        assert torch.equal(unet.eval()(x, t, class_labels=y).sample, expected)
