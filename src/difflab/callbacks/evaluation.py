"""FID / KID during training, from the EMA weights and a fixed seed (``python train.py callbacks=evaluation``)."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch

from difflab.callbacks.shares import draw_share, fixed_labels, gather_shares, rank_share
from difflab.metrics import FeatureExtractor, ReferenceCache, dataset_description, extract_features, fid_kid
from difflab.metrics.reference import reference_images, reference_manifest
from difflab.module import DiffusionModule
from difflab.samplers import Sampler

METRICS = ("fid", "kid_mean", "kid_std")


class Evaluation(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end, log ``eval/fid``, ``eval/kid_mean``, ``eval/kid_std``.

    The samples are those of SampleGrid's scheme: ``num_samples`` images of a fixed ``seed`` from
    the EMA weights (a class-conditional model: every class equally often, at ``guidance_scale``),
    so values compare across steps and runs. They are scored against the real images of
    ``reference_split`` in the feature space of ``features``; reference features are computed once
    and cached on disk (:mod:`difflab.metrics.reference`).

    Under DDP each rank samples its contiguous share and computes its features, the (N, d)
    features are gathered, and rank 0 computes FID / KID and broadcasts the values: every rank
    takes part in every collective and none samples while another waits. The real images' features
    are split the same way the first time, so a large reference set does not stall the other ranks.

    The values go to the loggers at the evaluation's step and, during training, into the
    callback metrics, so ``ModelCheckpoint(monitor="eval/fid", mode="min")`` with
    ``every_n_train_steps`` equal to ``every_n_steps`` keeps the best checkpoint (Lightning runs
    checkpoint callbacks after this one). The feature network lives in this callback, never in the
    LightningModule, so it stays out of the diffusion checkpoints.
    """

    def __init__(
        self,
        features: FeatureExtractor,
        sampler: Sampler,
        every_n_steps: int = 1000,
        num_samples: int = 1000,
        seed: int = 0,
        batch_size: int = 64,
        guidance_scale: float = 1.0,
        reference_split: str = "train",
        cache_dir: str | os.PathLike | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
    ) -> None:
        if every_n_steps <= 0 or batch_size <= 0:
            raise ValueError(f"every_n_steps and batch_size must be positive, got {every_n_steps}, {batch_size}")
        if num_samples < 2:
            raise ValueError(f"num_samples must be at least 2 for FID and KID, got {num_samples}")
        self.features, self.sampler = features, sampler
        self.every_n_steps, self.num_samples, self.seed, self.batch_size = every_n_steps, num_samples, seed, batch_size
        self.guidance_scale, self.reference_split, self.cache_dir = guidance_scale, reference_split, cache_dir
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.reference: torch.Tensor | None = None  # (M, d) on rank 0
        self.last_step = -1

    def on_fit_start(self, trainer: L.Trainer, module: DiffusionModule) -> None:
        self.features.to(module.device)
        self.reference = self._reference(trainer, module)

    def _reference(self, trainer: L.Trainer, module: DiffusionModule) -> torch.Tensor | None:
        """The real images' features on rank 0 (None elsewhere): from the cache, else extracted by all ranks."""
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("the Evaluation callback takes its reference images from the fit's datamodule; none given")
        images = reference_images(datamodule, self.reference_split)
        source = {**dataset_description(datamodule), "split": self.reference_split}
        cache, manifest = ReferenceCache(self.cache_dir), reference_manifest(images, self.features, source)
        cached = cache.load(manifest) if trainer.is_global_zero else None
        if trainer.strategy.broadcast(cached is not None, src=0):
            return None if cached is None else cached.double()
        lo, hi, share = rank_share(images.shape[0], trainer.world_size, trainer.global_rank)
        mine = torch.zeros(share, self.features.num_features, dtype=torch.float64)
        mine[: hi - lo] = extract_features(self.features, images[lo:hi], self.batch_size)
        features = gather_shares(trainer, module, mine, images.shape[0])
        if trainer.is_global_zero:
            cache.save(manifest, features)
            return features
        return None

    def evaluate(self, trainer: L.Trainer, module: DiffusionModule) -> dict[str, float] | None:
        """FID / KID of the current EMA weights (the same values on every rank); None if already done at this step."""
        step = trainer.global_step
        if step == self.last_step:
            return None
        self.last_step = step
        labels = fixed_labels(module, self.num_samples)
        num_samples = self.num_samples if labels is None else len(labels)
        images, count = draw_share(
            trainer, module, self.sampler, num_samples, self.seed, labels, self.guidance_scale, self.batch_size
        )
        mine = torch.zeros(images.shape[0], self.features.num_features, dtype=torch.float64)
        mine[:count] = extract_features(self.features, images[:count], self.batch_size)
        generated = gather_shares(trainer, module, mine, num_samples)
        values = None
        if trainer.is_global_zero:
            scores = fid_kid(generated, self.reference, self.kid_subsets, self.kid_subset_size, self.seed)
            values = {f"eval/{name}": scores[name] for name in METRICS}
        values = trainer.strategy.broadcast(values, src=0)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
        return values

    def on_train_batch_end(self, trainer: L.Trainer, module: DiffusionModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            values = self.evaluate(trainer, module)
            for name, value in (values or {}).items():  # into the callback metrics, for ModelCheckpoint(monitor=...)
                module.log(name, value, logger=False, prog_bar=name == "eval/fid")

    def on_train_end(self, trainer: L.Trainer, module: DiffusionModule) -> None:
        if 0 < trainer.max_steps and trainer.global_step < trainer.max_steps:
            return  # stopped early (preempted): keep the grace period for the checkpoint
        self.evaluate(trainer, module)
