"""Stage 2 of latent diffusion: the latent group, its scaling, the latent cache, sampling through the decoder, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel

from difflab.build import load_checkpoint
from difflab.data import DigitsDataModule
from difflab.errors import ConfigError
from difflab.latent import LatentSpace, cached_latents
from difflab.samplers import DDIM
from difflab.tasks import sample, train
from difflab.vae import save_vae
from tests.conftest import TINY_TRAIN, compose, run_script

LATENT = ["latent=vae"]


@pytest.fixture(scope="module")
def vae_dir(stage1):
    """The tiny stage-1 VAE (f = 2, 2 latent channels) of conftest's train_vae run; its <run dir>/vae."""
    return stage1[0] / "vae"


@pytest.fixture(scope="module")
def latent_run(vae_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stage2") / "run"
    train(compose("train", [*TINY_TRAIN, *LATENT, f"latent.path={vae_dir}", "noise=spectral", f"output_dir={run_dir}"]))
    return run_dir


def _digits(resolution: int = 8) -> DigitsDataModule:
    data = DigitsDataModule(resolution=resolution)
    data.setup("fit")
    return data


def test_the_scale_estimate_gives_unit_std_latents(vae_dir):
    images = _digits().train_set.images
    latent = LatentSpace(str(vae_dir), (1, 8, 8), scaling_factor="estimate")
    assert not latent.scaled
    first = [latent.encode(b) for b in images[:2048].split(256)][:8]
    assert "estimated as 1/std" in latent.decide_scale(first)
    std = latent.scale(torch.cat([latent.encode(b) for b in images.split(256)])).std().item()
    assert abs(std - 1) <= 0.1, std
    # auto keeps the VAE config's factor only where it gives this data a std within [0.8, 1.25]
    auto = LatentSpace(str(vae_dir), (1, 8, 8), scaling_factor="auto")
    config_std = auto.vae.config.scaling_factor * torch.cat(first).std().item()
    how = auto.decide_scale(first)
    assert ("from the VAE config" in how) == (0.8 <= config_std <= 1.25)
    assert LatentSpace(str(vae_dir), (1, 8, 8), scaling_factor=0.5).scaling_factor.item() == 0.5
    with pytest.raises(ConfigError, match="latent.scaling_factor='std' is not an option: use auto, config, estimate"):
        LatentSpace(str(vae_dir), (1, 8, 8), scaling_factor="std")


def test_stage1_to_stage2_to_sample_py(latent_run, vae_dir, tmp_path):
    """The UNet follows the latents; the VAE stays out of checkpoints; the scale and the noise fit (on scaled latents)
    are saved with the run; sample.py decodes to images."""
    module = load_checkpoint(latent_run)
    assert module.net.sample_shape == (2, 4, 4) and module.image_shape == (1, 8, 8)
    ckpt = torch.load(latent_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(".vae." in f".{k}" for k in ckpt["state_dict"])
    assert ckpt["state_dict"]["latent.scaling_factor"].item() == pytest.approx(module.latent.scaling_factor.item())
    summary = json.loads((latent_run / "latent.json").read_text())
    assert summary["scaling_factor"] == pytest.approx(module.latent.scaling_factor.item())
    assert summary["fingerprint"] == ckpt["hyper_parameters"]["run_config"]["latent"]["fingerprint"]
    # the noise was fitted on the scaled latents of the training images
    images = _digits().train_set.images
    latents = module.latent.scale(torch.cat([module.latent.encode(b) for b in images.split(256)]))
    assert module.noise.shape == (2, 4, 4)
    assert torch.allclose(module.noise.mean.float(), latents.mean(0), atol=1e-4)
    out = tmp_path / "s"
    run_script("sample.py", f"ckpt={latent_run}", "num_samples=5", "sampler=dpmpp_2m", "sampler.num_steps=5",
               "progress=false", f"out_dir={out}")
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (5, 8, 8, 1) and arr.dtype == np.uint8 and arr.std() > 0


def test_latent_with_class_conditioning_and_guidance(vae_dir, tmp_path):
    train(compose("train", [*TINY_TRAIN, *LATENT, f"latent.path={vae_dir}", "conditioning=class", f"output_dir={tmp_path}"]))
    out = sample(compose("sample", [f"ckpt={tmp_path}", "labels=[3,7]", "num_samples=4", "guidance_scale=2",
                                    "sampler.num_steps=4", "progress=false", f"output_dir={tmp_path / 's'}"]))
    assert out["images"].shape == (4, 8, 8, 1) and out["labels"].tolist() == [3, 7, 3, 7]


def test_the_cache_is_reused_and_rebuilt_when_the_vae_changes(vae_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    first = LatentSpace(str(vae_dir), (1, 8, 8), cache=True, cache_dir=str(cache_dir))
    data = _digits()
    path, train_latents, val_latents = cached_latents(data, first)
    data.serve_latents(train_latents, val_latents)
    assert data.train_source is train_latents and data.val_source is val_latents
    assert data.train_set.images.shape[1] == 1  # the images stay what train_set holds
    with torch.no_grad():
        assert torch.allclose(train_latents.images[:64], first.encode(data.train_set.images[:64]), atol=1e-6)
    mtime = path.stat().st_mtime_ns
    assert cached_latents(_digits(), LatentSpace(str(vae_dir), (1, 8, 8), cache_dir=str(cache_dir)))[0] == path
    assert path.stat().st_mtime_ns == mtime  # reused, not re-encoded
    # another VAE (the same architecture, other weights): another fingerprint, another file, other latents
    other_dir = tmp_path / "other_vae"
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, low_cpu_mem_usage=False)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.5)
    save_vae(vae, other_dir)
    other = LatentSpace(str(other_dir), (1, 8, 8), cache_dir=str(cache_dir))
    assert other.fingerprint != first.fingerprint
    data_other = _digits()
    other_path, other_latents, _ = cached_latents(data_other, other)
    assert other_path != path and not torch.allclose(other_latents.images, train_latents.images)
    stored = torch.load(other_path, weights_only=True)
    assert stored["manifest"]["vae"] == other.fingerprint
    # a damaged file is rebuilt, never trusted
    other_path.write_bytes(other_path.read_bytes()[:100])
    assert cached_latents(_digits(), other)[0] == other_path
    assert torch.load(other_path, weights_only=True)["manifest"]["vae"] == other.fingerprint


def test_training_on_cached_latents(vae_dir, tmp_path):
    proc = run_script("train.py", *TINY_TRAIN, *LATENT, f"latent.path={vae_dir}", "latent.cache=true",
                      f"latent.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert "latent cache:" in proc.stdout and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert load_checkpoint(tmp_path / "run").generate(DDIM(num_steps=3), 2).shape == (2, 1, 8, 8)


def test_a_changed_vae_is_refused_at_load(latent_run, vae_dir, tmp_path):
    moved = tmp_path / "vae_copy"
    shutil.copytree(vae_dir, moved)
    assert load_checkpoint(latent_run, vae_path=str(moved)).latent.path == str(moved)  # same files: fine
    config = json.loads((moved / "config.json").read_text())
    config["scaling_factor"] = 0.123
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="is not the one this model was trained with"):
        load_checkpoint(latent_run, vae_path=str(moved))


def test_bad_latent_inputs_fail_before_training(vae_dir, tmp_path):
    def fails(match: str, *overrides: str) -> None:
        run = tmp_path / str(len(list(tmp_path.iterdir())))
        with pytest.raises(ConfigError, match=match):
            train(compose("train", [*TINY_TRAIN, *LATENT, *overrides, f"output_dir={run}"]))
        assert not (run / "checkpoints").exists()

    fails(r"VAE path .*nowhere does not exist", f"latent.path={tmp_path / 'nowhere'}")
    unet_dir = tmp_path / "a_unet"
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(unet_dir)
    fails(r"holds a UNet2DModel .*not an AutoencoderKL", f"latent.path={unet_dir}")
    rgb_dir = tmp_path / "rgb_vae"
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), norm_num_groups=8, latent_channels=2).save_pretrained(rgb_dir)
    fails(r"the VAE takes 3-channel images but the dataset's have 1 channels", f"latent.path={rgb_dir}")
    fails(r"the latents are 2x3x3 .*not divisible by the UNet's downsampling factor 2.*multiple of 4",
          f"latent.path={vae_dir}", "dataset.resolution=6")
    fails(r"sampler.clip_x0 cannot be used with latent=vae", f"latent.path={vae_dir}", "sampler.clip_x0=true")


def test_export_carries_the_vae_and_the_noise_statistics(latent_run, tmp_path):
    """export.py of a latent model with shaped noise: vae/ and noise.safetensors beside the UNet, and why no pipeline."""
    from difflab.export import export_diffusers
    from difflab.noise import load_noise

    module = load_checkpoint(latent_run)
    manifest = export_diffusers(module, tmp_path, {"global_step": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["difflab.json", "noise.safetensors", "scheduler", "unet", "vae"]
    assert manifest["latent"]["scaling_factor"] == pytest.approx(float(module.latent.scaling_factor))
    assert manifest["latent"]["latent_shape"] == list(module.latent.shape) and manifest["sample_shape"] == [2, 4, 4]
    assert [b.split(" (")[0] for b in manifest["ddpm_pipeline_blockers"]] == ["latent-space", "shaped noise"]
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    z = torch.randn(2, *module.latent.shape)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, module.latent.vae.decode(z).sample, rtol=0, atol=0)
    noise = load_noise(tmp_path / manifest["noise"]["file"])
    assert noise.name == manifest["noise"]["name"] == "spectral"
    for key, value in module.noise.state_dict().items():
        assert torch.equal(noise.state_dict()[key], value), key


def test_bits_per_dim_are_refused_for_a_latent_model(latent_run):
    from difflab.likelihood import check_supported
    from difflab.noise import IIDNoise

    module = load_checkpoint(latent_run)
    module.noise = IIDNoise(module.noise.shape)  # leave the latent space as the only reason
    with pytest.raises(ConfigError, match=r"not supported for a latent-space model \(latent=vae\)"):
        check_supported(module)
