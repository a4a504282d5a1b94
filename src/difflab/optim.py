"""Learning-rate schedules over optimizer steps (the ``lr_scheduler`` config group), built on torch's schedulers.

Both warm up linearly as torch's ``LinearLR`` does (factor 1/W at step 0, 1 from step W on). ``constant`` then
holds the rate: it is ``LinearLR`` itself. ``cosine`` then decays by half a cosine to ``min_lr_ratio`` times the
rate at ``total_steps`` (``trainer.max_steps``) and stays there: a ``LambdaLR`` over :class:`WarmupCosine`, a
closed form of the step alone, so a resumed run continues the same curve (the scheduler's step count is in
every checkpoint). torch has warm-up (``LinearLR``) and cosine (``CosineAnnealingLR``) but no warm-up-then-cosine
to a floor in one closed form; ``SequentialLR`` chains them recursively.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LinearLR, LRScheduler


def _check_warmup(warmup_steps: int) -> int:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"lr_scheduler.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    return warmup_steps


def constant(optimizer: Optimizer, warmup_steps: int = 0) -> LRScheduler | None:
    """Linear warm-up over ``warmup_steps`` steps, then the optimizer's rate; None without warm-up."""
    if _check_warmup(warmup_steps) == 0:
        return None
    return LinearLR(optimizer, start_factor=1.0 / warmup_steps, total_iters=warmup_steps)


class WarmupCosine:
    """The rate's factor at step s: 1/W + (1 - 1/W) s/W for s < W (as ``LinearLR``), then
    r + (1 - r) (1 + cos(pi (s - W) / (S - W))) / 2 up to S = ``total_steps``, then r = ``min_lr_ratio``."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        w, s, r = self.warmup_steps, self.total_steps, self.min_lr_ratio
        if step < w:
            return 1.0 / w + (1.0 - 1.0 / w) * step / w
        progress = min(1.0, (step - w) / (s - w))
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` x the rate at step ``total_steps``."""
    _check_warmup(warmup_steps)
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= warmup_steps:
        raise ValueError(
            f"lr_scheduler=cosine decays until trainer.max_steps, which must be an integer above "
            f"lr_scheduler.warmup_steps={warmup_steps}: got total_steps={total_steps!r} (set trainer.max_steps, or "
            f"lr_scheduler=constant for a run bounded by epochs)"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"lr_scheduler.min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, float(min_lr_ratio)))
