"""Work split over DDP ranks: each rank draws its contiguous share of the fixed-seed samples, then all gather.

Every rank works at the same time and every rank takes part in each collective, so no rank waits
in a collective while another samples (the NCCL-timeout trap of diffusers #3886). Sample i
depends on (seed, i) only, so the result is the same for any number of ranks.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from difflab.guidance import balanced_labels
from difflab.module import DiffusionModule
from difflab.samplers import Sampler


def rank_share(num_items: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """(lo, hi, share): rank ``rank``'s items [lo, hi) of ``num_items`` cut into ``world_size`` shares of ``share``.

    The last shares may be short or empty (hi - lo < share).
    """
    share = -(-num_items // world_size)
    lo = min(rank * share, num_items)
    return lo, min(lo + share, num_items), share


def gather_shares(trainer: L.Trainer, module: L.LightningModule, mine: Tensor, num_items: int) -> Tensor:
    """All ranks' (share, ...) tensors (zero-padded) joined in rank order and trimmed: (num_items, ...) on CPU."""
    if trainer.world_size > 1:
        mine = module.all_gather(mine.to(module.device)).reshape(-1, *mine.shape[1:])
    return mine[:num_items].cpu()


def fixed_labels(module: DiffusionModule, num_samples: int) -> Tensor | None:
    """The labels of a class-conditional model's fixed samples (every class equally often, at least ``num_samples``);
    a text model's: the token ids (N, L) of :func:`fixed_prompts`."""
    prompts = fixed_prompts(module, num_samples)
    if prompts is not None:
        return module.conditioning.token_ids(prompts, strict=True)
    return balanced_labels(module.num_classes, num_samples) if module.num_classes else None


def fixed_prompts(module: DiffusionModule, num_samples: int) -> list[str] | None:
    """A text model's prompts of its fixed samples: each of ``conditioning.sample_prompts`` equally often (at least
    ``num_samples`` in all), prompt-major; None for other models."""
    prompts = getattr(module.conditioning, "sample_prompts", None)
    if not prompts:
        return None
    per_prompt = -(-num_samples // len(prompts))
    return [p for p in prompts for _ in range(per_prompt)]


def draw_share(
    trainer: L.Trainer,
    module: DiffusionModule,
    sampler: Sampler,
    num_samples: int,
    seed: int,
    labels: Tensor | None = None,
    guidance_scale: float = 1.0,
    batch_size: int = 64,
) -> tuple[Tensor, int]:
    """This rank's share of samples 0..num_samples-1 from the EMA weights: ((share, C, H, W) zero-padded, count drawn).

    ``labels`` (num_samples,) for a class-conditional model; ``guidance_scale`` falls back to 1 on
    a model trained without label dropout (it has no unconditional eps to guide with).
    """
    if module.p_uncond <= 0:
        guidance_scale = 1.0
    lo, hi, share = rank_share(num_samples, trainer.world_size, trainer.global_rank)
    mine = torch.zeros(share, *module.image_shape)
    if hi > lo:
        mine[: hi - lo] = module.generate(
            sampler, hi - lo, seed, batch_size, labels=None if labels is None else labels[lo:hi],
            guidance_scale=guidance_scale, first_index=lo,
        )
    return mine, hi - lo
