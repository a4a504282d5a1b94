"""The one sampling loop every sampler shares."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.noise import PerSampleNoise
from difflab.samplers.timesteps import Spacing, step_pairs, timestep_grid

Denoiser = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
"""eps = denoiser(x_t (B, C, H, W), t (B,) long, y (B,) long or None)."""


def sample_loop(
    denoiser: Denoiser,
    step: Callable[[Tensor, Tensor, Tensor, Tensor, "Tensor | None"], Tensor],
    alphas_cumprod: Tensor,
    pairs: Sequence[tuple[int, int]],
    x: Tensor,
    noise: PerSampleNoise | None,
    y: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Walk (t, t_prev) pairs from x = x_T: eps = denoiser(x, t, y); x = step(x, eps, abar_t, abar_{t'}, z).

    ``noise`` supplies z (per sample) for stochastic steps; the last step gets z = None.
    """
    one = alphas_cumprod.new_ones(())
    t_batch = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for t, t_prev in tqdm(pairs, desc="sampling", disable=not progress, leave=False):
        eps = denoiser(x, t_batch.fill_(t), y)
        abar_prev = alphas_cumprod[t_prev] if t_prev >= 0 else one
        z = noise.randn(x.shape[1:], x.dtype) if noise is not None and t_prev >= 0 else None
        x = step(x, eps, alphas_cumprod[t], abar_prev, z)
    return x


@dataclass
class Sampler:
    """A sampler: a step rule walked over ``num_steps`` timesteps (None: all T) with a ``spacing``."""

    num_steps: int | None = None
    spacing: Spacing = "trailing"
    stochastic: ClassVar[bool] = False

    def step(self, x_t: Tensor, eps: Tensor, abar_t: Tensor, abar_prev: Tensor, z: Tensor | None) -> Tensor:
        """One step x_t -> x_{t'}."""
        raise NotImplementedError

    def pairs(self, num_train_timesteps: int) -> list[tuple[int, int]]:
        """The (t, t_prev) pairs this sampler walks."""
        return step_pairs(timestep_grid(num_train_timesteps, self.num_steps or num_train_timesteps, self.spacing))

    @torch.no_grad()
    def __call__(
        self,
        denoiser: Denoiser,
        alphas_cumprod: Tensor,
        noise: PerSampleNoise,
        shape: Sequence[int],
        y: Tensor | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Draw len(noise) samples of ``shape`` (C, H, W) from x_T ~ N(0, I); returns (N, C, H, W)."""
        x = noise.randn(shape)
        pairs = self.pairs(alphas_cumprod.numel())
        return sample_loop(
            denoiser, self.step, alphas_cumprod.to(x.device), pairs, x, noise if self.stochastic else None, y, progress
        )
