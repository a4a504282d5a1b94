"""Stage 1 of latent diffusion: the AutoencoderKL module, its training task, saving, loading, scaling, fingerprints."""

from __future__ import annotations

import functools
import json
import os
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel
from safetensors.torch import load_file

from difflab.data.digits import DigitsDataModule
from difflab.errors import ConfigError
from difflab.vae import (
    estimate_scaling_factor,
    kl_per_element,
    latent_shape,
    load_vae,
    save_vae,
    vae_fingerprint,
)
from tests.conftest import TINY_VAE, compose, run_script



@functools.cache
def _digits() -> DigitsDataModule:
    """The default digits (16 x 16) split as train_vae splits them: 1,617 training and 180 held-out images."""
    data = DigitsDataModule()
    data.setup("fit")
    return data


def _held_out() -> torch.Tensor:
    return _digits().val_set.images


@torch.no_grad()
def _rec_mse(vae: AutoencoderKL, x: torch.Tensor) -> float:
    """Held-out reconstruction MSE from the posterior mean, the quantity VAEModule logs as val/rec_mse."""
    return torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item()


@pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")  # training_step outside a fit
def test_round_trip_shapes_and_loss():
    from difflab.build import build_autoencoder

    for name, latent in (("small", (4, 4, 4)), ("tiny", (2, 8, 8))):
        module = build_autoencoder(compose("vae", [f"autoencoder={name}", "output_dir=/unused"]))
        x = _held_out()[:5]
        assert latent_shape(module.vae, x.shape[1:]) == latent
        posterior = module.vae.encode(x).latent_dist
        assert posterior.mean.shape == posterior.std.shape == (5, *latent)
        assert module.vae.decode(posterior.sample()).sample.shape == x.shape == (5, 1, 16, 16)
    # the KL term is the closed form 1/2 (mu^2 + sigma^2 - 1 - log sigma^2) averaged over latent elements
    mu, logvar = posterior.mean.detach(), posterior.logvar.detach()
    by_hand = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).mean()
    torch.testing.assert_close(kl_per_element(posterior).detach(), by_hand)
    torch.manual_seed(0)
    loss = module.training_step((x, torch.zeros(5)), 0)
    torch.manual_seed(0)
    z = module.vae.encode(x).latent_dist.sample()
    rec = (module.vae.decode(z).sample - x).abs().mean()  # rec_loss: l1
    torch.testing.assert_close(loss, rec + module.kl_weight * kl_per_element(module.vae.encode(x).latent_dist))


def test_short_training_lowers_the_held_out_error(stage1):
    run_dir, metrics, before = stage1
    after, held_out = metrics["val/rec_mse_ema"], _held_out()
    mean_image = torch.nn.functional.mse_loss(_digits().train_set.images.mean(0).expand_as(held_out), held_out).item()
    assert before > 0.5 and 0.15 < mean_image < 0.2  # untrained: worse than predicting the mean digit (0.18)
    # measured: 0.69 -> 0.044 in 60 steps (EMA weights; 0.038 raw), so the factor 8 holds with a 2x margin
    assert after < before / 8 and after < mean_image / 2, (before, after)
    assert metrics["val/rec_mse"] < before / 8
    assert 0 < metrics["val/kl_ema"] < 100
    assert sorted(p.name for p in (run_dir / "reconstructions").iterdir()) == ["step_000030.png", "step_000060.png"]


def test_saved_vae_loads_offline_with_the_ema_weights(stage1, monkeypatch):
    run_dir, _, _ = stage1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vae = load_vae(run_dir / "vae")
    assert isinstance(vae, AutoencoderKL) and not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    assert sorted(p.name for p in (run_dir / "vae").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    ema = {k.removeprefix("ema.module."): v for k, v in state.items() if k.startswith("ema.module.")}
    raw = {k.removeprefix("vae."): v for k, v in state.items() if k.startswith("vae.")}
    loaded = vae.state_dict()
    assert loaded.keys() == ema.keys()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)  # bit-identical to the EMA weights of the last step
    assert not all(torch.equal(loaded[k], raw[k]) for k in raw)  # ... which are not the raw weights


def test_scaling_factor_gives_unit_std_latents(stage1):
    run_dir, _, _ = stage1
    vae = load_vae(run_dir / "vae")
    factor = vae.config.scaling_factor
    # the saved factor is the estimate over the first 512 training images (a posterior sample, seed 0)
    assert factor == pytest.approx(estimate_scaling_factor(vae, _digits().train_set.images[:512].split(128)), rel=1e-12)
    assert factor != 1.0
    with torch.no_grad():
        z = vae.encode(_held_out()).latent_dist.sample(torch.Generator().manual_seed(1)) * factor
    assert abs(z.std().item() - 1) < 0.1, z.std().item()  # on images it was not estimated on
    # law of total variance: Var(z) = Var(mu) + E[sigma^2], so the mean's factor is the larger one
    images = _digits().train_set.images[:512]
    with torch.no_grad():
        sigma2 = vae.encode(images).latent_dist.var.mean().item()
    from_mean = estimate_scaling_factor(vae, [images], posterior="mean")
    assert from_mean > factor
    assert factor**-2 == pytest.approx(from_mean**-2 + sigma2, rel=0.02)


def test_resuming_with_other_autoencoder_settings_is_refused(stage1):
    from difflab.tasks import train_vae

    run_dir, _, _ = stage1
    before = (run_dir / "vae" / "config.json").read_text()
    with pytest.raises(ConfigError, match="other autoencoder settings than this command"):
        train_vae(compose("vae", [*TINY_VAE, "autoencoder.kl_weight=0.01", f"output_dir={run_dir}"]))
    assert (run_dir / "vae" / "config.json").read_text() == before


def _tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=1, out_channels=1, block_out_channels=[8], norm_num_groups=8, latent_channels=2,
        down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
    )


def test_fingerprint_follows_the_vae_not_the_place(tmp_path):
    first = save_vae(_tiny_vae(0), tmp_path / "a", scaling_factor=0.5)
    print_a = vae_fingerprint(first)
    shutil.copytree(first, tmp_path / "copy")
    assert vae_fingerprint(tmp_path / "copy") == print_a
    assert vae_fingerprint(save_vae(_tiny_vae(1), tmp_path / "a", scaling_factor=0.5)) != print_a  # new weights
    assert vae_fingerprint(save_vae(_tiny_vae(0), tmp_path / "a", scaling_factor=0.6)) != print_a  # new config
    assert vae_fingerprint(save_vae(_tiny_vae(0), tmp_path / "a", scaling_factor=0.5)) == print_a
    assert json.loads((tmp_path / "a" / "config.json").read_text())["scaling_factor"] == 0.5


class Killed(BaseException):
    """Stands in for the signal that ends a process mid-write."""


def test_a_save_killed_midway_leaves_the_previous_vae(tmp_path, monkeypatch):
    path = save_vae(_tiny_vae(0), tmp_path / "vae", scaling_factor=0.5)
    before = vae_fingerprint(path)

    def dies_halfway(self, save_directory, **kwargs):
        os.makedirs(save_directory, exist_ok=True)
        (save_directory / "config.json").write_text("{}")  # part of the VAE reaches the disk, then the kill
        raise Killed

    monkeypatch.setattr(AutoencoderKL, "save_pretrained", dies_halfway)
    with pytest.raises(Killed):
        save_vae(_tiny_vae(1), path, scaling_factor=0.7)
    monkeypatch.undo()
    assert vae_fingerprint(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # no temporary dir left behind
    assert load_vae(path).config.scaling_factor == 0.5


def test_load_vae_errors_name_the_path_and_what_is_expected(tmp_path):
    expected = "expected a directory holding a diffusers AutoencoderKL"
    with pytest.raises(ConfigError, match=f"VAE path {tmp_path / 'nope'} does not exist: {expected}"):
        load_vae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"VAE path {tmp_path / 'empty'} has no config.json: {expected}"):
        load_vae(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"VAE path {tmp_path / 'file'} is not a directory"):
        load_vae(tmp_path / "file")
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=8,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                ).save_pretrained(tmp_path / "unet")
    with pytest.raises(ConfigError, match=f"VAE path {tmp_path / 'unet'} holds a UNet2DModel .*not an AutoencoderKL"):
        load_vae(tmp_path / "unet")
    pipeline = tmp_path / "pipeline"
    save_vae(_tiny_vae(), pipeline / "vae")
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"is a pipeline: its VAE is {pipeline / 'vae'}"):
        load_vae(pipeline)
    assert isinstance(load_vae(pipeline / "vae"), AutoencoderKL)


def test_bad_stage1_settings_fail_before_training(tmp_path):
    from difflab.tasks import train_vae

    def run(*overrides):
        return train_vae(compose("vae", [*TINY_VAE, f"output_dir={tmp_path}", *overrides]))

    with pytest.raises(ConfigError, match="the VAE takes 3-channel images but the dataset's have 1 channels"):
        run("autoencoder.vae.in_channels=3")
    with pytest.raises(ConfigError, match="image size 10x10 is not divisible by the VAE's downsampling factor 4"):
        run("autoencoder=small", "dataset.resolution=10")
    with pytest.raises(ConfigError, match="autoencoder.rec_loss=l3 is not an option: use one of l1, l2"):
        run("autoencoder.rec_loss=l3")
    with pytest.raises(ConfigError, match="autoencoder.kl_weight must be >= 0, got -1"):
        run("autoencoder.kl_weight=-1")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_train_vae_script_links_latest_and_prints_the_vae_path(tmp_path):
    proc = run_script("train_vae.py", *TINY_VAE, "trainer.max_steps=4", "trainer.val_check_interval=4", "run_id=first",
                      cwd=tmp_path)
    assert "vae:         outputs/vae/first/vae\n" in proc.stdout
    assert "latest:      outputs/vae/latest -> first (python train.py latent=vae latent.path=outputs/vae/latest/vae)" in proc.stdout
    assert "val/rec_mse_ema:" in proc.stdout
    assert os.readlink(tmp_path / "outputs" / "vae" / "latest") == "first"
    vae = load_vae(tmp_path / "outputs" / "vae" / "latest" / "vae")
    assert vae.config.in_channels == 1 and vae.config.latent_channels == 2 and vae.config.sample_size == 16
    weights = load_file(tmp_path / "outputs" / "vae" / "first" / "vae" / "diffusion_pytorch_model.safetensors")
    assert weights.keys() == vae.state_dict().keys()
