"""DiffusionModule: the LightningModule that trains eps_theta with L_simple and keeps EMA weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.optim.lr_scheduler import LinearLR

from difflab.denoiser import UNetDenoiser
from difflab.ema import EMA
from difflab.losses import simple_loss
from difflab.noise import PerSampleNoise
from difflab.samplers import Sampler
from difflab.schedule import NoiseSchedule


class DiffusionModule(L.LightningModule):
    """Schedule + UNet denoiser + L_simple + EMA; AdamW with linear warm-up.

    ``tasks.build_module`` saves the resolved run config as this module's hyper-parameters, so every
    checkpoint rebuilds its model without the training config at hand.
    """

    def __init__(
        self,
        net: UNetDenoiser,
        schedule: NoiseSchedule,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        adam_betas: Sequence[float] = (0.9, 0.999),
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
    ) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.ema = EMA(net, decay=ema_decay, warmup=ema_warmup)
        self.lr, self.weight_decay, self.adam_betas = lr, weight_decay, tuple(adam_betas)
        self.warmup_steps = warmup_steps

    def loss(self, x0: Tensor, net: UNetDenoiser, generator: torch.Generator | None = None) -> Tensor:
        """L_simple at t ~ U{0..T-1}, eps ~ N(0, I) (Algorithm 1); x0 (B, C, H, W) in [-1, 1]."""
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return simple_loss(net(self.schedule.q_sample(x0, t, noise), t, None), noise)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch[0], self.net)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The EMA follows each optimizer step here, before any callback's on_train_batch_end, so a
        # checkpoint written at step k holds the EMA of step k (not k - 1) and resumes exactly.
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net)
        self.log("train/ema_decay", self.ema.current_decay())

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # The same t and noise for every validation pass, so the curve shows the model, not the draw.
        x0 = batch[0]
        for name, net in (("val/loss", self.net), ("val/loss_ema", self.ema.module)):
            generator = torch.Generator(device=x0.device).manual_seed(batch_idx)
            self.log(name, self.loss(x0, net, generator), prog_bar=name == "val/loss_ema")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay, betas=self.adam_betas
        )
        if self.warmup_steps <= 0:
            return {"optimizer": optimizer}
        warmup = LinearLR(optimizer, start_factor=1.0 / self.warmup_steps, total_iters=self.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    @torch.no_grad()
    def generate(
        self,
        sampler: Sampler,
        num_samples: int,
        seed: int = 0,
        batch_size: int = 64,
        use_ema: bool = True,
        progress: bool = False,
    ) -> Tensor:
        """Draw ``num_samples`` images (N, C, H, W) in [-1, 1]; sample i depends on (seed, i) only."""
        if num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        net = self.ema.module if use_ema else self.net
        was_training = net.training
        net.eval()
        batches = []
        for start in range(0, num_samples, batch_size):
            noise = PerSampleNoise.for_indices(seed, range(start, min(start + batch_size, num_samples)), self.device)
            batches.append(
                sampler(net, self.schedule.alphas_cumprod, noise, self.net.sample_shape, progress=progress).cpu()
            )
        net.train(was_training)
        return torch.cat(batches)
