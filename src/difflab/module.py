"""DiffusionModule: the LightningModule that trains the denoiser with its objective and keeps EMA weights."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from difflab.checkpointing import atomic_write
from difflab.data.base import training_batches
from difflab.denoiser import PredictionDenoiser, UNetDenoiser
from difflab.ema import EMA
from difflab.errors import ConfigError
from difflab.guidance import ClassifierFreeGuidance, ClassifierGuidance, Conditioning, Unconditional
from difflab.latent import LatentSpace
from difflab.losses import simple_loss, vlb_term
from difflab.noise import IIDNoise, ShapedNoise
from difflab.objectives import (
    DiffusionLoss,
    Objective,
    Prediction,
    Space,
    check_objective,
    check_space,
    objective_target,
)
from difflab.samplers import DDPM, Denoiser, Sampler
from difflab.schedule import NoiseSchedule, q_sample_abar, step_variances
from difflab.seeding import PerSampleNoise, derived_generator
from difflab.timestep_sampling import TimestepSampler

NOISE_FILE = "noise.safetensors"
"""The fitted noise statistics in the run dir (they are in every checkpoint too)."""
LATENT_FILE = "latent.json"
"""The latent space of a run (VAE path and fingerprint, the scaling factor used) in its run dir."""
QUARTERS = 4
"""Validation losses are also logged per quarter of the timestep range (improved-diffusion's quartiles)."""
Precision = Literal["fp32", "bf16"]
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
"""The network's precision when sampling: none (float32) or the autocast dtype."""


class DiffusionModule(L.LightningModule):
    """Schedule + UNet denoiser + its loss + EMA, trained by ``optimizer`` under ``lr_scheduler``.

    The ``loss`` (:class:`~difflab.objectives.DiffusionLoss`) is a weighted MSE on the ``objective``'s target
    (eps, x0 or v; see :mod:`difflab.objectives`), plus, when the UNet learns its variance, ``vlb_weight`` T L_t
    of the variational bound with the mean's gradient stopped (L_hybrid of Nichol & Dhariwal 2021). t is drawn
    by its ``timestep_sampling`` (uniform, or loss-aware importance sampling).

    ``conditioning`` (:mod:`difflab.guidance`) says what the UNet is conditioned on: nothing, or class labels,
    which training drops to the null label (index ``num_classes``, its own embedding) with probability
    ``p_uncond``, as classifier-free guidance needs at sampling time.

    ``optimizer`` and ``lr_scheduler`` are factories (Hydra ``_partial_``): params -> Optimizer, Optimizer ->
    LRScheduler or None (stepped every optimizer step).

    With a ``latent`` space (:mod:`difflab.latent`) the process's data x0 is s E(image) of a frozen VAE,
    and generated samples are decoded; the scale s is decided at the start of a fresh fit.

    ``noise`` shapes the diffusion noise, eps = A z (:mod:`difflab.noise`): the process runs on whitened
    y = A^-1 (x0 - mu), where it is standard DDPM; the network sees A y_t and predicts the white z (or y0,
    v in y), or with ``prediction_space="data"`` their coloured A z (A y0, A v), which A^-1 maps back; samples
    map back by x = A y + mu. With iid noise (the default) every map is the identity and
    runs are bit-identical to plain DDPM. Fitted statistics are fitted once on rank 0 at the start of a
    fresh fit, broadcast, and kept as buffers in every checkpoint (and ``<run dir>/noise.safetensors``).

    The timesteps, noise, label dropout and self-conditioning coin of each training step come from a
    generator seeded by (``seed``, step, rank, micro-batch): ranks draw independent noise, and a
    resumed run draws exactly what an uninterrupted one would.

    ``gradient_checkpointing`` recomputes the UNet's activations block by block in the backward pass (diffusers'
    ``enable_gradient_checkpointing``): the same gradients for less memory (docs/benchmarks.md).

    :func:`difflab.build.build_module` saves the resolved run config as this module's hyper-parameters, so every
    checkpoint rebuilds its model without the training config at hand.
    """

    def __init__(
        self,
        net: UNetDenoiser,
        schedule: NoiseSchedule,
        objective: Objective = "eps",
        prediction_space: Space = "white",
        loss: DiffusionLoss | None = None,
        conditioning: Conditioning | None = None,
        optimizer: Callable[[Iterable[nn.Parameter]], Optimizer] | None = None,
        lr_scheduler: Callable[[Optimizer], LRScheduler | None] | None = None,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        compile: bool = False,
        channels_last: bool = False,
        gradient_checkpointing: bool = False,
        seed: int = 0,
        noise: ShapedNoise | None = None,
        latent: LatentSpace | None = None,
    ) -> None:
        super().__init__()
        self.objective = check_objective(objective)
        self.prediction_space = check_space("prediction_space", prediction_space)
        if schedule.zero_terminal_snr and objective == "eps":
            raise ValueError(
                "schedule.zero_terminal_snr=true needs objective=v (or x0): at abar_{T-1} = 0 the input is pure noise, "
                "eps = x_t there, and x0 cannot be recovered from an eps prediction"
            )
        self.loss = loss if loss is not None else DiffusionLoss()
        self.conditioning = conditioning if conditioning is not None else Unconditional()
        for key, value in self.conditioning.unet_config().items():
            if net.unet.config.get(key) != value:
                raise ValueError(
                    f"the {type(self.conditioning).__name__} conditioning needs a UNet with {key}={value}, "
                    f"got {net.unet.config.get(key)}"
                )
        if net.learn_variance != self.loss.learn_variance:
            raise ValueError(f"loss.learn_variance={self.loss.learn_variance}, but the UNet's is {net.learn_variance}")
        if gradient_checkpointing:  # diffusers' own: activations recomputed in the backward pass, per UNet block
            net.unet.enable_gradient_checkpointing()
        self.net = net
        self.schedule = schedule
        self.latent = latent
        if latent is not None and latent.shape != net.sample_shape:
            raise ValueError(f"the VAE's latents are {latent.shape}, the UNet takes {net.sample_shape}")
        self.noise = noise if noise is not None else IIDNoise(net.sample_shape)
        if self.noise.shape != net.sample_shape:
            raise ValueError(f"{self.noise.option} was built for shape {self.noise.shape}, the UNet takes {net.sample_shape}")
        self.timesteps = TimestepSampler(schedule.num_timesteps, self.loss.timestep_sampling)
        self.ema = EMA(net, decay=ema_decay, warmup=ema_warmup)
        self.optimizer_factory = optimizer if optimizer is not None else torch.optim.AdamW
        self.lr_scheduler_factory = lr_scheduler
        self.compile, self.channels_last = compile, channels_last
        self.seed = seed
        # beta, beta~, beta~ clipped of each step t -> t-1, indexed by t (the likelihood terms of a learned variance)
        full = [(t, t - 1) for t in range(schedule.num_timesteps - 1, -1, -1)]
        for name, values in zip(("step_beta", "step_beta_tilde", "step_beta_tilde_clipped"), step_variances(schedule.alphas_cumprod, full)):
            self.register_buffer(name, values.flip(0), persistent=False)
        self._step_started: float | None = None
        self._batch_images = 0
        self._micro_batch = 0

    @property
    def num_classes(self) -> int | None:
        """The number of classes of a class-conditional model; None otherwise."""
        return self.conditioning.num_classes

    @property
    def p_uncond(self) -> float:
        """The probability with which training dropped a label (0 for an unconditional model)."""
        return self.conditioning.p_uncond

    @property
    def null_label(self) -> int | None:
        """The label index that means "no class" (classifier-free guidance's unconditional pass)."""
        return self.conditioning.num_classes

    def configure_model(self) -> None:
        """Speed knobs, applied in each training process: channels_last memory and torch.compile of the UNet.

        ``nn.Module.compile`` compiles in place, so state-dict keys (checkpoints, EMA) are unchanged;
        the EMA copy that samples stays uncompiled.
        """
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.compile and getattr(self.net.unet, "_compiled_call_impl", None) is None:
            self.net.unet.compile()

    @property
    def pixel_space(self) -> bool:
        """Whether the sampler's state is the 8-bit image itself (x0 in [-1, 1]): no VAE, iid noise with no mean."""
        return self.latent is None and self.noise.is_identity

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model generates (the VAE's decoded size in latent space)."""
        return self.net.sample_shape if self.latent is None else self.latent.image_shape

    def diffusion_data(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x0 of the process for a batch: the images, or in latent space s E(images) (s z for cached latents z)."""
        if self.latent is None:
            return x
        return self.latent.scale(x if self.latent.cache else self.latent.encode(x, generator))

    def on_fit_start(self) -> None:
        """Decide the latent scale, then fit the noise's statistics on the scaled training stream: each once, on
        rank 0 in float64, broadcast to every rank and written to the run dir.

        A resumed run's checkpoint was restored before this hook and holds both: nothing is redone.
        """
        run_dir, rank_zero = Path(self.trainer.default_root_dir), self.trainer.is_global_zero
        if self.latent is not None and not self.latent.scaled:
            if rank_zero:
                first = training_batches(self.trainer.datamodule)[: self.latent.scale_batches]
                z = [b if self.latent.cache else self.latent.encode(b.to(self.device)) for b in first]
                how = self.latent.decide_scale(z)
                print(f"latent scale: {float(self.latent.scaling_factor):.6g} ({how})", flush=True)
            self.latent.scaling_factor.copy_(self.trainer.strategy.broadcast(self.latent.scaling_factor.cpu(), src=0))
            if rank_zero:
                atomic_write(run_dir / LATENT_FILE, lambda f: f.write(json.dumps(self.latent.summary(), indent=2).encode()))
        if not self.noise.fitted:
            if rank_zero:
                self.noise.fit(self.diffusion_data(b.to(self.device)) for b in training_batches(self.trainer.datamodule))
                self.noise.save(run_dir / NOISE_FILE)
            state = self.trainer.strategy.broadcast({k: v.cpu() for k, v in self.noise.state_dict().items()}, src=0)
            self.noise.load_state_dict(state)

    def denoiser(self, net: UNetDenoiser, precision: Precision = "fp32") -> PredictionDenoiser:
        """pred = f(x_t, t, abar_t, y) over ``net`` (the raw or the EMA network), in this model's objective.

        x_t is the sampler's whitened state; the network sees A x_t. ``precision="bf16"``: the network under bf16
        autocast (its output back in float32).
        """
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision} is not one of {', '.join(PRECISIONS)}")
        color = whiten = None
        if not self.noise.isotropic:
            color = self.noise.color
            whiten = self.noise.whiten if self.prediction_space == "data" else None
        return PredictionDenoiser(net, self.objective, color, PRECISIONS[precision], whiten)

    def step_generator(self) -> torch.Generator:
        """The generator of this training step's random draws, seeded by (seed, global step, rank, micro-batch)."""
        return derived_generator(self.seed, self.global_step, self.global_rank, self._micro_batch, device=self.device)

    def losses(
        self, x0: Tensor, net: UNetDenoiser, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-sample losses (B,), their timesteps t (B,) and importance weights (B,) or None (Algorithm 1).

        x0 (B, C, H, W) data, y (B,) or None. The loss of a sample is w(t) ||target - output||^2 (mean over
        elements; targets in whitened coordinates) plus, with a learned variance, vlb_weight * T * L_t in bits/dim.
        """
        x0 = self.noise.from_data(x0)  # y0 = A^-1 (x0 - mu); the data itself for iid noise
        t, importance = self.timesteps.sample(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        abar_t = self.schedule.abar(t, x0.ndim)
        x_t = q_sample_abar(x0, abar_t, noise)
        denoiser = self.denoiser(net)
        x0_self_cond = None
        if net.self_condition and torch.rand((), device=x0.device, generator=generator) < 0.5:
            with torch.no_grad():  # Chen et al. 2022, Algorithm 1: half the time, condition on a first estimate
                x0_self_cond = denoiser.read(net(denoiser.network_input(x_t), t, y), x_t, abar_t).x0
        model_input = denoiser.network_input(x_t, x0_self_cond)
        if self.channels_last:
            model_input = model_input.contiguous(memory_format=torch.channels_last)
        pred = denoiser.read(net(model_input, t, y), x_t, abar_t)
        output, target = pred.output, objective_target(self.objective, x0, noise, abar_t)
        if self.loss.space == "data" and not self.noise.isotropic:  # ||A e||^2 n / tr C
            scale = (self.noise.dim / self.noise.trace()).sqrt().to(x0.dtype)
            output, target = scale * self.noise.color(output), scale * self.noise.color(target)
        losses = simple_loss(output, target, self.loss.weight(abar_t, self.objective))
        if net.learn_variance:
            losses = losses + self.loss.vlb_weight * self.schedule.num_timesteps * self.vlb(x0, pred.with_output(pred.output.detach()), t)
        return losses, t, importance

    def vlb(self, x0: Tensor, pred: Prediction, t: Tensor, sampler: DDPM | None = None) -> Tensor:
        """L_t of the variational bound in bits/dim (B,) at the prediction ``pred`` made at x_t = pred.x_t.

        x0 is in the sampler's (whitened) coordinates. The reverse variance is ``sampler``'s choice (beta,
        beta~, learned; default: learned if the model learns it, else beta~); L_0 is the discretised decoder
        of 8-bit pixels in pixel space, a Gaussian density otherwise.
        """
        sampler = sampler or DDPM(variance="auto")
        shape = (-1, *([1] * (x0.ndim - 1)))
        variances = [v[t].view(shape) for v in (self.step_beta, self.step_beta_tilde, self.step_beta_tilde_clipped)]
        return vlb_term(
            x0, pred.x_t, pred.x0, self.schedule.abar(t, x0.ndim), self.schedule.abar(t - 1, x0.ndim),
            sampler.log_sigma2(pred, *variances), variances[2].log(), t == 0, discrete=self.pixel_space,
        )

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        generator = self.step_generator()
        self._micro_batch += 1
        y = self.conditioning.training_condition(batch, generator)
        losses, t, importance = self.losses(self.diffusion_data(batch[0], generator), self.net, y, generator)
        loss = (losses if importance is None else importance * losses).mean()
        if self.timesteps.kind != "uniform":  # every rank records every rank's losses, so all sample alike
            gathered = self.all_gather(torch.stack([t.to(losses.dtype), losses.detach()]))
            gathered = gathered.transpose(0, 1).reshape(2, -1) if gathered.ndim == 3 else gathered
            self.timesteps.update(gathered[0].long(), gathered[1])
        self.log("train/loss", loss, prog_bar=True)
        self._batch_images = batch[0].shape[0]
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The EMA follows each optimizer step here, before any callback's on_train_batch_end, so a
        # checkpoint written at step k holds the EMA of step k (not k - 1) and resumes exactly.
        super().optimizer_step(*args, **kwargs)
        self._micro_batch = 0
        if any(p.grad is not None for p in self.net.parameters()):  # a step without gradients (skipped) changed nothing
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

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        """val/loss and val/loss_ema, also per quarter of [0, T) (``_q0`` .. ``_q3``), on fixed t and noise."""
        x0 = self.diffusion_data(batch[0], torch.Generator(device=batch[0].device).manual_seed(batch_idx))
        y = self.conditioning.condition(batch)
        for name, net in (("val/loss", self.net), ("val/loss_ema", self.ema.module)):
            # The same t and noise for every validation pass, so the curve shows the model, not the draw.
            generator = torch.Generator(device=x0.device).manual_seed(batch_idx)
            losses, t, _ = self.losses(x0, net, y, generator)
            self.log(name, losses.mean(), prog_bar=name == "val/loss_ema", sync_dist=True, batch_size=len(losses))
            quarter = t * QUARTERS // self.schedule.num_timesteps
            for q in range(QUARTERS):
                members = quarter == q
                if members.any():
                    self.log(f"{name}_q{q}", losses[members].mean(), sync_dist=True, batch_size=int(members.sum()))

    def configure_optimizers(self) -> dict[str, Any]:
        """The ``optimizer`` over the UNet's parameters and its ``lr_scheduler``, stepped every optimizer step."""
        optimizer = self.optimizer_factory(self.net.parameters())
        scheduler = self.lr_scheduler_factory(optimizer) if self.lr_scheduler_factory is not None else None
        if scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def check_sampler(self, sampler: Sampler) -> None:
        """Refuse x0 clipping / dynamic thresholding where x0 is not an image in [-1, 1] (latents, shaped noise)."""
        option = "sampler.clip_x0" if sampler.clip_x0 else "sampler.dynamic_threshold"
        if sampler.shapes_x0 and self.latent is not None:
            raise ConfigError(
                f"{option} cannot be used with latent=vae: x0 is a latent, not an image in [-1, 1]; set {option} off"
            )
        self.noise.check_clipping(option, sampler.shapes_x0)

    def check_guidance_scale(self, guidance_scale: float) -> None:
        """Refuse classifier-free guidance (w != 1) on a model that never learned the unconditional eps."""
        if guidance_scale != 1.0 and self.p_uncond <= 0:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a model trained with label dropout "
                f"(conditioning=class, p_uncond > 0; or caption dropout, conditioning=text); this one has num_classes={self.num_classes}, "
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
        precision: Precision = "fp32",
        null: Tensor | None = None,
    ) -> Denoiser:
        """pred = f(x_t, t, abar_t, y): the (EMA) network, wrapped in classifier-free and/or classifier guidance.

        Classifier guidance takes the mean-shift form for a DDPM ``sampler``, the eps form otherwise. ``null``:
        the unconditional pass's input if not the conditioning's own (a negative prompt's token ids (L,)).
        """
        denoiser: Denoiser = self.denoiser(self.ema.module if use_ema else self.net, precision)
        self.check_guidance_scale(guidance_scale)
        if guidance_scale != 1.0:
            null = self.conditioning.null_condition() if null is None else null
            denoiser = ClassifierFreeGuidance(denoiser, guidance_scale, null, guidance_rescale)
        if classifier is not None:
            shift = sampler.mean_shift_as_x0(self.schedule.alphas_cumprod) if isinstance(sampler, DDPM) else None
            denoiser = ClassifierGuidance(denoiser, self.classifier_on_data(classifier), classifier_scale, shift)
        return denoiser

    def classifier_on_data(self, classifier: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        """The classifier as a function of the sampler's state y_t: it sees x_t = A y_t + sqrt(abar_t) mu.

        That is sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the noisy image it was trained on (with shaped eps),
        and autograd turns its gradient into grad_y = A^T grad_x. The classifier itself for iid noise.
        """
        if self.noise.is_identity:
            return classifier

        def on_data(y_t: Tensor, t: Tensor) -> Tensor:
            x_t = self.noise.color(y_t)
            if self.noise.center:
                x_t = x_t + self.schedule.abar(t, y_t.ndim).sqrt().to(y_t.dtype) * self.noise.mean.to(y_t.dtype)
            return classifier(x_t, t)

        return on_data

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
        :meth:`guided_denoiser` (use_ema, guidance_scale, ...). ``progress``: one bar over all N images,
        advanced at every network evaluation.
        """
        if num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        self.check_sampler(sampler)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if labels is not None and len(labels) != num_samples:
            raise ValueError(f"got {len(labels)} labels for {num_samples} samples")
        nets = [self.ema.module, self.net]
        modes = [net.training for net in nets]
        for net in nets:
            net.eval()
        batches = []
        bar = tqdm(total=num_samples, desc="sampling", disable=not progress, dynamic_ncols=True,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} images [{elapsed}<{remaining}]")
        for start in range(0, num_samples, batch_size):
            stop = min(start + batch_size, num_samples)
            noise = PerSampleNoise.for_indices(seed, range(first_index + start, first_index + stop), self.device)
            y = None if labels is None else labels[start:stop].to(self.device)
            denoiser = self.guided_denoiser(sampler=sampler, **guidance)  # one per batch: self-conditioning state
            y0 = sampler(denoiser, self.schedule.alphas_cumprod, noise, self.net.sample_shape, y,
                         lambda share, n=stop - start: bar.update(min(share * n, num_samples - bar.n)), self.objective)
            x0 = self.noise.to_data(y0)
            batches.append((x0 if self.latent is None else self.latent.decode(x0)).cpu())
        bar.close()
        for net, mode in zip(nets, modes):
            net.train(mode)
        return torch.cat(batches)
