"""A noise-aware classifier p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, section 4).

The network is a UNet encoder built from diffusers' blocks (Timesteps, TimestepEmbedding,
DownBlock2D), pooled to class logits; it trains with cross-entropy on x_t = q_sample(x0, t, eps)
at t ~ U{0..T-1} from the same schedule as the diffusion model it will guide.

With ``noise_aware=False`` the same task trains on clean images only (t = 0, x_t = x0): the
dataset's own classifier whose pooled features :class:`difflab.metrics.ClassifierFeatures` uses
for FID and KID (``python train_classifier.py --config-name feature_classifier``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import DownBlock2D
from torch import Tensor, nn

from difflab.schedule import NoiseSchedule


class NoisyClassifier(nn.Module):
    """logits = f(x_t, t): conv in, one DownBlock2D per width with the timestep embedding, mean pool, linear."""

    def __init__(
        self, in_channels: int, num_classes: int, block_out_channels: Sequence[int] = (32, 64, 64), norm_num_groups: int = 8
    ) -> None:
        super().__init__()
        widths = list(block_out_channels)
        temb = 4 * widths[0]
        self.time_proj = Timesteps(widths[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(widths[0], temb)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            DownBlock2D(c_in, c_out, temb, resnet_groups=norm_num_groups, add_downsample=i < len(widths) - 1)
            for i, (c_in, c_out) in enumerate(zip([widths[0], *widths[:-1]], widths))
        )
        self.norm = nn.GroupNorm(norm_num_groups, widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)

    @property
    def num_features(self) -> int:
        """Width of :meth:`features`, the pooled input of the class head."""
        return self.head.in_features

    def features(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x_t (B, C, H, W), t (B,) long -> the pooled penultimate features (B, num_features)."""
        temb = self.time_embedding(self.time_proj(t).to(x_t.dtype))
        h = self.conv_in(x_t)
        for block in self.blocks:
            h, _ = block(h, temb)
        return F.silu(self.norm(h)).mean(dim=(2, 3))

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x_t (B, C, H, W), t (B,) long -> logits (B, num_classes)."""
        return self.head(self.features(x_t, t))


class ClassifierModule(L.LightningModule):
    """Trains a NoisyClassifier with cross-entropy on noised images; logs accuracy on clean and noisy inputs.

    ``noise_aware=False`` trains and validates at t = 0 on the clean images (a feature network for
    FID / KID rather than a guide); such a classifier cannot guide sampling.
    """

    def __init__(
        self, net: NoisyClassifier, schedule: NoiseSchedule, lr: float = 1e-3, weight_decay: float = 0.0,
        noise_aware: bool = True,
    ) -> None:
        super().__init__()
        self.net, self.schedule, self.lr, self.weight_decay = net, schedule, lr, weight_decay
        self.noise_aware = noise_aware

    def _noisy(self, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x_t, t) with t ~ U{0..T-1} and x_t = q_sample(x0, t, eps); (x0, 0) when not noise-aware."""
        if not self.noise_aware:
            return x0, torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return self.schedule.q_sample(x0, t, noise), t

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x_t, t = self._noisy(batch[0])
        loss = F.cross_entropy(self.net(x_t, t), batch[1])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x0, y = batch
        x_t, t = self._noisy(x0, torch.Generator(device=x0.device).manual_seed(batch_idx))
        logits = self.net(x_t, t)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)
        clean = self.net(x0, torch.zeros_like(t))
        self.log("val/acc_t0", (clean.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
