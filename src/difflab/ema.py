"""Exponential moving average of the weights, on torch.optim.swa_utils.AveragedModel."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


class EMA(AveragedModel):
    """theta_ema <- d theta_ema + (1 - d) theta after each optimizer step, d = min(decay, (1 + n) / (10 + n)).

    The warm-up (n = updates so far; as in TensorFlow's ExponentialMovingAverage with num_updates)
    lets short runs benefit: early on the average forgets the random initialisation quickly. The
    update is one ``torch._foreach_lerp_`` per device and dtype (measured 3x faster than a Python
    loop, 4x faster than diffusers' EMAModel on this CPU; see ../shared/NOTES.md).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got decay={decay}")
        super().__init__(model, multi_avg_fn=self._lerp, use_buffers=True)
        self.module.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup

    def current_decay(self, num_updates: int | None = None) -> float:
        """The decay d applied at the next update (after ``num_updates`` updates; default: so far)."""
        n = int(self.n_averaged) if num_updates is None else num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def _lerp(self, ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        # AveragedModel already syncs on n_averaged each update, so reading it here costs nothing more.
        weight = 1.0 - self.current_decay(int(num_averaged) - 1)
        if ema_params[0].is_floating_point():
            torch._foreach_lerp_(ema_params, params, weight)
        else:  # integer buffers (counters) are copied, not averaged
            torch._foreach_copy_(ema_params, params)
