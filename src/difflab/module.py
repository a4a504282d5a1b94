"""DiffusionModule: the LightningModule that trains eps_theta with L_simple and keeps EMA weights."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.optim.lr_scheduler import LinearLR

from difflab.denoiser import UNetDenoiser
from difflab.ema import EMA
from difflab.guidance import ClassifierFreeGuidance, ClassifierGuidance, drop_labels
from difflab.losses import simple_loss
from difflab.noise import PerSampleNoise
from difflab.samplers import DDPM, Sampler
from difflab.schedule import NoiseSchedule


class DiffusionModule(L.LightningModule):
    """Schedule + UNet denoiser + L_simple + EMA; AdamW with linear warm-up.

    With ``num_classes`` set, the UNet is class-conditional and training replaces each label by
    the null label (index ``num_classes``, its own embedding) with probability ``p_uncond``, which
    classifier-free guidance needs at sampling time.

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
        num_classes: int | None = None,
        p_uncond: float = 0.0,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"conditioning.p_uncond must lie in [0, 1), got {p_uncond}")
        if num_classes is not None and net.unet.config.num_class_embeds != num_classes + 1:
            raise ValueError(
                f"a {num_classes}-class model needs a UNet with num_class_embeds={num_classes + 1} (one null label), "
                f"got {net.unet.config.num_class_embeds}"
            )
        self.num_classes, self.p_uncond = num_classes, p_uncond
        self.net = net
        self.schedule = schedule
        self.ema = EMA(net, decay=ema_decay, warmup=ema_warmup)
        self.lr, self.weight_decay, self.adam_betas = lr, weight_decay, tuple(adam_betas)
        self.warmup_steps = warmup_steps
        self.compile, self.channels_last = compile, channels_last
        self._step_started: float | None = None
        self._batch_images = 0

    @property
    def null_label(self) -> int | None:
        """The label index that means "no class" (classifier-free guidance's unconditional pass)."""
        return self.num_classes

    def configure_model(self) -> None:
        """Speed knobs, applied in each training process: channels_last memory and torch.compile of the UNet.

        ``nn.Module.compile`` compiles in place, so state-dict keys (checkpoints, EMA) are unchanged;
        the EMA copy that samples stays uncompiled.
        """
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.compile and getattr(self.net.unet, "_compiled_call_impl", None) is None:
            self.net.unet.compile()

    def loss(
        self, x0: Tensor, net: UNetDenoiser, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """L_simple at t ~ U{0..T-1}, eps ~ N(0, I) (Algorithm 1); x0 (B, C, H, W) in [-1, 1], y (B,) or None."""
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.schedule.q_sample(x0, t, noise)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return simple_loss(net(x_t, t, y), noise)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        y = drop_labels(batch[1], self.p_uncond, self.null_label) if self.num_classes else None
        loss = self.loss(batch[0], self.net, y)
        self.log("train/loss", loss, prog_bar=True)
        self._batch_images = batch[0].shape[0]
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The EMA follows each optimizer step here, before any callback's on_train_batch_end, so a
        # checkpoint written at step k holds the EMA of step k (not k - 1) and resumes exactly.
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net)
        self.log("train/ema_decay", self.ema.current_decay())
        # logged here rather than by LearningRateMonitor, which refuses to run without a logger
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        # images per second over all ranks, from one optimizer step to the next (includes data and callbacks)
        now = time.perf_counter()
        if self._step_started is not None:
            images = self._batch_images * self.trainer.world_size * self.trainer.accumulate_grad_batches
            self.log("train/images_per_sec", images / (now - self._step_started))
        self._step_started = now

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # The same t and noise for every validation pass, so the curve shows the model, not the draw.
        x0, y = batch[0], (batch[1] if self.num_classes else None)
        for name, net in (("val/loss", self.net), ("val/loss_ema", self.ema.module)):
            generator = torch.Generator(device=x0.device).manual_seed(batch_idx)
            self.log(name, self.loss(x0, net, y, generator), prog_bar=name == "val/loss_ema", sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay, betas=self.adam_betas
        )
        if self.warmup_steps <= 0:
            return {"optimizer": optimizer}
        warmup = LinearLR(optimizer, start_factor=1.0 / self.warmup_steps, total_iters=self.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def check_guidance_scale(self, guidance_scale: float) -> None:
        """Refuse classifier-free guidance (w != 1) on a model that never learned the unconditional eps."""
        if guidance_scale != 1.0 and (not self.num_classes or self.p_uncond <= 0):
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a model trained with label dropout "
                f"(conditioning=class, p_uncond > 0); this one has num_classes={self.num_classes}, "
                f"p_uncond={self.p_uncond}: use guidance_scale=1"
            )

    def guided_denoiser(
        self,
        use_ema: bool = True,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        classifier: Callable[[Tensor, Tensor], Tensor] | None = None,
        classifier_scale: float = 0.0,
        sampler: Sampler | None = None,
    ) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
        """eps = f(x_t, t, y): the (EMA) network, wrapped in classifier-free and/or classifier guidance.

        Classifier guidance takes the mean-shift form for a DDPM ``sampler``, the eps form otherwise.
        """
        denoiser: Callable[[Tensor, Tensor, Tensor | None], Tensor] = self.ema.module if use_ema else self.net
        self.check_guidance_scale(guidance_scale)
        if guidance_scale != 1.0:
            denoiser = ClassifierFreeGuidance(denoiser, guidance_scale, self.null_label, guidance_rescale)
        if classifier is not None:
            abar = self.schedule.alphas_cumprod
            ddpm = {"ddpm_pairs": sampler.pairs(len(abar)), "variance": sampler.variance} if isinstance(sampler, DDPM) else {}
            denoiser = ClassifierGuidance(denoiser, classifier, classifier_scale, abar, **ddpm)
        return denoiser

    @torch.no_grad()
    def generate(
        self,
        sampler: Sampler,
        num_samples: int,
        seed: int = 0,
        batch_size: int = 64,
        labels: Tensor | None = None,
        progress: bool = False,
        first_index: int = 0,
        **guidance: Any,
    ) -> Tensor:
        """Draw ``num_samples`` images (N, C, H, W) in [-1, 1]; sample i depends on (seed, i, labels[i]) only.

        The images are samples ``first_index ..`` of the seed's stream, so shares drawn on several
        ranks concatenate to the single-process result. ``labels`` (N,) long; ``guidance`` goes to
        :meth:`guided_denoiser` (use_ema, guidance_scale, ...).
        """
        if num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if labels is not None and len(labels) != num_samples:
            raise ValueError(f"got {len(labels)} labels for {num_samples} samples")
        denoiser = self.guided_denoiser(sampler=sampler, **guidance)
        nets = [self.ema.module, self.net]
        modes = [net.training for net in nets]
        for net in nets:
            net.eval()
        batches = []
        for start in range(0, num_samples, batch_size):
            stop = min(start + batch_size, num_samples)
            noise = PerSampleNoise.for_indices(seed, range(first_index + start, first_index + stop), self.device)
            y = None if labels is None else labels[start:stop].to(self.device)
            batches.append(sampler(denoiser, self.schedule.alphas_cumprod, noise, self.net.sample_shape, y, progress).cpu())
        for net, mode in zip(nets, modes):
            net.train(mode)
        return torch.cat(batches)
