"""Run config -> the LightningModule of each task, and the settings a run learns from its data before it is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from difflab.build.config import instantiate_node
from difflab.classifier import ClassifierModule
from difflab.errors import ConfigError
from difflab.module import DiffusionModule
from difflab.vae import VAEModule, vae_fingerprint


def with_classes(cfg: DictConfig, key: str, class_names: list[str], what: str) -> DictConfig:
    """``cfg`` with ``<key>.num_classes`` (and ``<key>.class_names`` if it has one) filled from the dataset's class
    names, or a ConfigError naming the mismatch; a new config, ``cfg`` is left as it was."""
    node = OmegaConf.select(cfg, key)
    if not class_names:
        raise ConfigError(
            f"{what} needs a dataset with classes; dataset {cfg.dataset._target_} has none "
            "(image_folder: put each class's images in its own sub-folder)"
        )
    if node.num_classes is not None and node.num_classes != len(class_names):
        raise ConfigError(f"{what}: num_classes={node.num_classes}, but the dataset has {len(class_names)} classes")
    filled: dict[str, Any] = {"num_classes": len(class_names)}
    if "class_names" in node:
        filled["class_names"] = list(class_names)
    update = OmegaConf.create({})
    OmegaConf.update(update, key, filled)
    return OmegaConf.merge(cfg, update)


TEXT_CONDITIONING = "difflab.text.TextConditioning"
SCRATCH_TEXT_ENCODER = "difflab.text.ScratchTextEncoder"


def text_conditioned(cfg: DictConfig) -> bool:
    """Whether ``cfg`` trains on captions (conditioning=text)."""
    return OmegaConf.select(cfg, "conditioning._target_") == TEXT_CONDITIONING


def with_captions(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``dataset.captions=true`` where conditioning=text asks a dataset that makes its own (the digits)."""
    if text_conditioned(cfg) and cfg.dataset.get("captions") is False:
        return OmegaConf.merge(cfg, {"dataset": {"captions": True}})
    return cfg


def training_config(cfg: DictConfig, class_names: list[str], captions: list[str] | None = None) -> DictConfig:
    """The run config a train.py run saves: ``cfg`` with what the data and the VAE decide filled in: the classes of
    class conditioning, the tokenizer a scratch text encoder builds from the training ``captions`` (as JSON data),
    the latent VAE's fingerprint (a later load refuses a changed VAE)."""
    if "num_classes" in (cfg.get("conditioning") or {}):
        cfg = with_classes(cfg, "conditioning", class_names, "conditioning=class")
    if text_conditioned(cfg):
        if not captions:
            raise ConfigError(
                f"conditioning=text needs captions, and dataset {cfg.dataset._target_} has none: the digits make their "
                "own, image_folder reads metadata.jsonl or metadata.csv (file_name, text), hf a "
                "dataset.caption_column, shards KEY.txt"
            )
        if not cfg.conditioning.get("sample_prompts"):
            from difflab.text import sample_prompts

            cfg = OmegaConf.merge(cfg, {"conditioning": {"sample_prompts": sample_prompts(captions)}})
        if cfg.text_encoder._target_ == SCRATCH_TEXT_ENCODER and cfg.text_encoder.get("tokenizer") is None:
            from difflab.text import build_tokenizer

            cfg = OmegaConf.merge(cfg, {"text_encoder": {"tokenizer": build_tokenizer(captions)}})
    if OmegaConf.select(cfg, "latent._target_") is not None and not OmegaConf.is_missing(cfg.latent, "path"):
        vae_dir = Path(cfg.latent.path).expanduser()
        if cfg.latent.get("fingerprint") is None and (vae_dir / "config.json").is_file():  # else LatentSpace refuses it
            cfg = OmegaConf.merge(cfg, {"latent": {"fingerprint": vae_fingerprint(vae_dir)}})
    return cfg


def build_module(cfg: DictConfig) -> DiffusionModule:
    """The DiffusionModule of a run config: ``cfg.model`` with the schedule, objective, loss, conditioning, noise,
    latent space, optimizer and LR schedule of ``cfg``. ``cfg`` is not changed.

    The UNet's shape follows the data: its size, C channels in (2C with self-conditioning), C out (2C with a
    learned variance), and the embeddings its conditioning needs.
    """
    image_shape = (int(cfg.dataset.channels), int(cfg.dataset.resolution), int(cfg.dataset.resolution))
    latent = None
    if OmegaConf.select(cfg, "latent._target_") is not None:
        if OmegaConf.is_missing(cfg.latent, "path"):
            raise ConfigError(
                "latent=vae needs latent.path=DIR, a diffusers AutoencoderKL directory: outputs/vae/latest/vae from "
                "train_vae.py, or a local copy of a public VAE (docs/latent.md)"
            )
        latent = instantiate_node(cfg.latent, "latent", image_shape=image_shape)
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
    if "num_classes" in (cfg.get("conditioning") or {}) and not cfg.conditioning.num_classes:
        raise ConfigError("conditioning=class needs conditioning.num_classes (taken from a dataset with classes)")
    loss = instantiate_node(cfg.loss, "loss")
    text = {}
    if text_conditioned(cfg):
        if cfg.get("text_encoder") is None:
            raise ConfigError("conditioning=text needs a text_encoder (text_encoder=scratch or clip)")
        text = {"text_encoder": cfg.text_encoder}
    conditioning = instantiate_node(cfg.conditioning, "conditioning", _convert_="all", **text)
    check_cross_attention(cfg, conditioning.unet_config())
    self_condition = bool(OmegaConf.select(cfg, "model.net.self_condition", default=False))
    unet: dict[str, Any] = {
        "sample_size": size,
        "in_channels": channels * (2 if self_condition else 1),
        "out_channels": channels * (2 if loss.learn_variance else 1),
        **conditioning.unet_config(),
    }
    net: dict[str, Any] = {"learn_variance": loss.learn_variance, "unet": unet}
    if text:
        from difflab.text import cross_attention_unet

        unet |= cross_attention_unet(OmegaConf.to_container(cfg.model.net.unet))
        net["text_encoder"] = conditioning.text_encoder.build()
    module = instantiate_node(
        cfg.model, "model", schedule=instantiate_node(cfg.schedule, "schedule"), objective=cfg.get("objective", "eps"),
        prediction_space=cfg.get("prediction_space", "white"), loss=loss, conditioning=conditioning,
        seed=int(cfg.get("seed", 0)),
        optimizer=instantiate_node(cfg.optimizer, "optimizer"),
        lr_scheduler=instantiate_node(cfg.lr_scheduler, "lr_scheduler") if cfg.get("lr_scheduler") else None,
        net=net,
        noise=instantiate_node(cfg.noise, "noise", shape=(channels, size, size)) if cfg.get("noise") else None,
        latent=latent,
    )
    module.save_hyperparameters({"run_config": OmegaConf.to_container(cfg, resolve=True)})
    return module


CROSS_ATTENTION_UNETS = ("diffusers.UNet2DConditionModel",)
"""UNets that cross-attend to an encoder's hidden states: only a conditioning that provides them can drive one."""


def check_cross_attention(cfg: DictConfig, unet_config: dict[str, Any]) -> None:
    """Refuse a cross-attention UNet (model=sd_small) under a conditioning that gives it nothing to attend to: a
    text conditioning names its encoder's width as ``cross_attention_dim`` in its ``unet_config()``."""
    target = OmegaConf.select(cfg, "model.net.unet._target_")
    if target in CROSS_ATTENTION_UNETS and "cross_attention_dim" not in unet_config:
        raise ConfigError(
            f"model.net.unet._target_={target} (model=sd_small) cross-attends to text: it needs conditioning=text, "
            f"got conditioning {cfg.conditioning._target_}; for conditioning=none or class use model=small, tiny, "
            "ddpm_cifar10, ddpm_256 or adm64"
        )


def build_classifier(cfg: DictConfig) -> ClassifierModule:
    """The ClassifierModule of a classifier run config (``cfg.classifier`` with ``cfg.schedule``)."""
    module = instantiate_node(cfg.classifier, "classifier", schedule=instantiate_node(cfg.schedule, "schedule"))
    module.save_hyperparameters({"run_config": OmegaConf.to_container(cfg, resolve=True)})
    return module


def build_autoencoder(cfg: DictConfig) -> VAEModule:
    """The VAEModule of a train_vae.py run config (``cfg.autoencoder``)."""
    module = instantiate_node(cfg.autoencoder, "autoencoder")
    module.save_hyperparameters({"run_config": OmegaConf.to_container(cfg, resolve=True)})
    return module
