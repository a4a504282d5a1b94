"""What a config from a file the user did not write may build: the allowlist of ``_target_`` callables.

A checkpoint carries its run config, and rebuilding the model means Hydra's ``instantiate`` on it, which
imports and calls whatever a ``_target_`` names: ``shutil.copyfile``, ``os.system``, ``torch.load`` of a
pickle. Before anything of such a config is built, :func:`check_stored_config` walks all of it and refuses
(naming the key and the target) any ``_target_`` outside :data:`BUILDABLE` and any interpolation (``${...}``
can decode new nodes at resolution time). The groups a stored config only records (trainer, callbacks,
loggers, the training grids' sampler, the in-training evaluation's features: a checkpoint never builds
them) are checked for interpolations only and then dropped, so no later code can build them.
"""

from __future__ import annotations

from typing import Any

from difflab.errors import ConfigError

BUILDABLE = frozenset({
    # model (conf/model), its network and the UNet / VAE classes of diffusers it names
    "difflab.module.DiffusionModule", "difflab.denoiser.UNetDenoiser", "diffusers.UNet2DModel",
    "diffusers.UNet2DConditionModel",
    "diffusers.AutoencoderKL", "difflab.vae.VAEModule",
    # schedule, loss, conditioning, optimizer, lr_scheduler
    "difflab.schedule.NoiseSchedule.linear", "difflab.schedule.NoiseSchedule.cosine",
    "difflab.schedule.NoiseSchedule.scaled_linear", "difflab.schedule.NoiseSchedule.sigmoid",
    "difflab.objectives.DiffusionLoss", "difflab.guidance.ClassLabels", "difflab.guidance.Unconditional",
    "difflab.text.TextConditioning", "difflab.text.ScratchTextEncoder", "difflab.text.PretrainedTextEncoder",
    "torch.optim.AdamW", "torch.optim.Adam", "torch.optim.SGD", "torch.optim.RAdam", "torch.optim.NAdam",
    "difflab.optim.constant", "difflab.optim.cosine",
    # noise, latent, dataset
    "difflab.noise.IIDNoise", "difflab.noise.OffsetNoise", "difflab.noise.CovarianceNoise",
    "difflab.noise.LowRankNoise", "difflab.noise.SpectralNoise", "difflab.latent.LatentSpace",
    "difflab.data.DigitsDataModule", "difflab.data.ImageFolderDataModule", "difflab.data.cifar.CifarDataModule",
    "difflab.data.hf.HFDataModule", "difflab.data.shards.ShardsDataModule",
    # classifier (train_classifier.py)
    "difflab.classifier.ClassifierModule", "difflab.classifier.NoisyClassifier",
})
"""Every callable a stored run config may name: the ``_target_`` of each option of difflab's own config groups
that a checkpoint rebuilds (tests check this against conf/)."""
RECORDED_ONLY = ("trainer", "callbacks", "logger", "sampler", "features", "hydra")
"""Top-level keys a stored run config records but nothing ever builds from it: dropped on reading."""


def _walk(node: Any, key: str, source: str, recorded: bool) -> None:
    if isinstance(node, dict):
        for k, value in node.items():
            child = f"{key}.{k}" if key else str(k)
            if k == "_target_" and not recorded and value not in BUILDABLE:
                raise ConfigError(
                    f"{source}: refusing to build {child}={value!r}: a config read from a file may only name "
                    "difflab's own classes (difflab.build.trust.BUILDABLE); nothing was built. A checkpoint from "
                    "someone else can run code this way: use checkpoints you or difflab wrote"
                )
            _walk(value, child, source, recorded)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _walk(value, f"{key}[{i}]", source, recorded)
    elif isinstance(node, str) and "${" in node:
        raise ConfigError(
            f"{source}: refusing {key}={node!r}: a stored run config holds resolved values, never an interpolation "
            "(it could build new config nodes when resolved); nothing was built"
        )


def check_stored_config(run_config: dict[str, Any], source: str) -> dict[str, Any]:
    """``run_config`` (plain containers, as read from ``source``) without its record-only groups, after checking
    every ``_target_`` in it against :data:`BUILDABLE`; a ConfigError naming the key and target otherwise."""
    for key, value in run_config.items():
        _walk(value, str(key), source, recorded=key in RECORDED_ONLY)
    return {key: value for key, value in run_config.items() if key not in RECORDED_ONLY}
