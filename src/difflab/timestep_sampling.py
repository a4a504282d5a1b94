"""How training draws t: uniformly (Ho et al. 2020), or by importance of each t's loss (Nichol & Dhariwal 2021)."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn

TimestepSampling = Literal["uniform", "loss_aware"]


class TimestepSampler(nn.Module):
    """t ~ p(t) with the importance weight 1 / (T p(t)), so E[w L_t] = (1/T) sum_t L_t for any p.

    ``uniform``: p = 1/T, every weight 1. ``loss_aware`` (improved-diffusion's
    LossSecondMomentResampler): p(t) proportional to sqrt(E[L_t^2]) over the last ``history``
    losses seen at each t, mixed with ``uniform_prob`` of the uniform distribution; uniform until
    every t has a full history. The history is a persistent buffer, so a resumed run keeps it.
    """

    losses: Tensor
    counts: Tensor

    def __init__(
        self, num_timesteps: int, kind: TimestepSampling = "uniform", history: int = 10, uniform_prob: float = 0.001
    ) -> None:
        super().__init__()
        if kind not in get_args(TimestepSampling):
            raise ValueError(f"unknown timestep sampling {kind!r}; allowed: {', '.join(get_args(TimestepSampling))}")
        self.num_timesteps, self.kind, self.uniform_prob = num_timesteps, kind, uniform_prob
        if kind == "loss_aware":
            self.register_buffer("losses", torch.zeros(num_timesteps, history, dtype=torch.float64))
            self.register_buffer("counts", torch.zeros(num_timesteps, dtype=torch.long))

    def probabilities(self) -> Tensor:
        """p(t) for t = 0..T-1, float64 (T,)."""
        if self.kind == "uniform" or bool((self.counts < self.losses.shape[1]).any()):
            return torch.full((self.num_timesteps,), 1 / self.num_timesteps, dtype=torch.float64)
        p = self.losses.square().mean(-1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """t (B,) long on ``device`` and importance weights 1 / (T p(t)) (B,), None when uniform."""
        if self.kind == "uniform":
            t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=device)
            return t, None
        p = self.probabilities().to(device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, (1 / (self.num_timesteps * p[t])).float()

    @torch.no_grad()
    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-sample losses (B,) seen at timesteps t (B,), oldest first out; all ranks pass the same."""
        if self.kind == "uniform":
            return
        history, counts = self.losses.cpu(), self.counts.cpu()  # one copy each way, not a device sync per sample
        for step, loss in zip(t.tolist(), losses.double().tolist()):
            if counts[step] == history.shape[1]:
                history[step] = torch.roll(history[step], -1)
                history[step, -1] = loss
            else:
                history[step, counts[step]] = loss
                counts[step] += 1
        self.losses.copy_(history)
        self.counts.copy_(counts)
