"""Guidance as wrappers around ``pred = denoiser(x_t, t, abar_t, y)``: every sampler gets it without change.

Classifier-free guidance (Ho & Salimans 2022): eps = eps_u + w (eps_c - eps_u), so w = 1 is the
plain conditional model and w = 0 the unconditional one. Classifier guidance (Dhariwal & Nichol
2021): the DDPM mean moves by s Sigma grad_x log p_phi(y | x_t, t); for other samplers
eps = eps_theta - s sqrt(1 - abar_t) grad_x log p_phi(y | x_t, t). Both take and return
:class:`~difflab.objectives.Prediction`, so they work with every objective and sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from difflab.objectives import Prediction
from difflab.samplers import Denoiser


class Conditioning:
    """What the UNet is conditioned on (the ``conditioning`` config group): the UNet config it needs, the labels it
    sees in training. The base is the unconditional model; an option is a subclass."""

    num_classes: int | None = None
    p_uncond: float = 0.0
    class_names: tuple[str, ...] = ()

    def unet_config(self) -> dict[str, int]:
        """The UNet config keys this conditioning needs: none."""
        return {}

    def training_labels(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
        """The labels the network sees in training: none."""
        return None

    def training_condition(self, batch: Sequence, generator: torch.Generator | None = None) -> Tensor | None:
        """What the network is conditioned on for a training batch (images, labels[, captions]): its labels after
        dropout (:meth:`training_labels`)."""
        return self.training_labels(batch[1], generator)

    def condition(self, batch: Sequence) -> Tensor | None:
        """What the network is conditioned on for a validation batch: its labels (none when unconditional)."""
        return batch[1] if self.num_classes else None

    def null_condition(self) -> int | Tensor | None:
        """Classifier-free guidance's unconditional input: the null label (none when unconditional)."""
        return self.num_classes


class Unconditional(Conditioning):
    """No conditioning (``conditioning=none``): the UNet has no class embedding and sees no labels."""


class ClassLabels(Conditioning):
    """Class labels (``conditioning=class``): diffusers' class embedding with ``num_classes`` + 1 entries, the last
    the null label, to which training drops each label with probability ``p_uncond`` (classifier-free guidance)."""

    def __init__(self, num_classes: int, p_uncond: float = 0.1, class_names: Sequence[str] = ()) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"conditioning.num_classes must be a positive integer (the dataset's classes), got {num_classes}"
            )
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"conditioning.p_uncond must lie in [0, 1), got {p_uncond}")
        if class_names and len(class_names) != num_classes:
            raise ValueError(f"conditioning.class_names has {len(class_names)} names for {num_classes} classes")
        self.num_classes, self.p_uncond, self.class_names = num_classes, p_uncond, tuple(class_names)

    def unet_config(self) -> dict[str, int]:
        """One class embedding per class and one for the null label."""
        return {"num_class_embeds": self.num_classes + 1}

    def training_labels(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``y`` with labels dropped to the null label (index ``num_classes``) with probability ``p_uncond``."""
        return drop_labels(y, self.p_uncond, self.num_classes, generator)


def balanced_labels(num_classes: int, num_samples: int) -> Tensor:
    """Class ids 0,0,..,1,1,..: ceil(num_samples / num_classes) of each class, class-major, shape (K * per_class,)."""
    per_class = -(-num_samples // num_classes)
    return torch.arange(num_classes).repeat_interleave(per_class)


def drop_labels(y: Tensor, p_uncond: float, null_label: int, generator: torch.Generator | None = None) -> Tensor:
    """y with each label replaced by ``null_label`` with probability ``p_uncond`` (Ho & Salimans 2022, Alg. 1)."""
    if p_uncond <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


class ClassifierFreeGuidance:
    """eps = eps_u + w (eps_c - eps_u): w = 1 conditional, w = 0 unconditional, w > 1 guided.

    Applied to the network's output in its own objective: eps, x0 and v are affine in one another
    at fixed x_t, so guiding any of them guides eps the same way. The conditional and unconditional
    passes run as one batched forward of 2B; w = 1 and w = 0 return exactly one pass. A learned
    variance is the conditional pass's. ``rescale`` (phi of Lin et al. 2023, eq. 15-16) mixes in the
    guided output rescaled to the conditional output's per-sample std; 0 disables it.
    """

    def __init__(self, denoiser: Denoiser, scale: float, null_label: int | Tensor, rescale: float = 0.0) -> None:
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must lie in [0, 1], got {rescale}")
        self.denoiser, self.scale, self.null_label, self.rescale = denoiser, scale, null_label, rescale

    def __call__(self, x_t: Tensor, t: Tensor, abar_t: Tensor, y: Tensor | None) -> Prediction:
        """``null_label``: the null class id (y (B,)), or the empty / negative prompt's token ids (L,) (y (B, L))."""
        if y is None:
            raise ValueError("classifier-free guidance needs class labels or prompts y")
        if isinstance(self.null_label, Tensor):
            null = self.null_label.to(y.device).expand_as(y)
        else:
            null = torch.full_like(y, self.null_label)
        if self.scale == 1.0:
            return self.denoiser(x_t, t, abar_t, y)
        if self.scale == 0.0:
            return self.denoiser(x_t, t, abar_t, null)
        both = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([abar_t, abar_t]), torch.cat([y, null]))
        cond, uncond = both.output.chunk(2)
        out = uncond + self.scale * (cond - uncond)
        if self.rescale > 0:
            dims = tuple(range(1, out.ndim))
            rescaled = out * (cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
            out = self.rescale * rescaled + (1 - self.rescale) * out
        frac = None if both.variance_frac is None else both.variance_frac.chunk(2)[0]
        return Prediction(out, both.objective, x_t, both.abar_t.chunk(2)[0], frac)


class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021) with g = grad_x log p_phi(y | x_t, t).

    For DDIM and any other sampler (their Algorithm 2): eps = eps_theta - s sqrt(1 - abar_t) g;
    skipped where abar_t = 0 (zero terminal SNR: eps = x_t there whatever the model says). For DDPM
    (``mean_shift_as_x0`` given, see :meth:`difflab.samplers.DDPM.mean_shift_as_x0`), their
    Algorithm 1: the step's mean moves by s Sigma g, done by moving x0_hat by s (Sigma / c_x0) g.
    s = 0 returns the denoiser's prediction untouched.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        classifier: Callable[[Tensor, Tensor], Tensor],
        scale: float,
        mean_shift_as_x0: Callable[[Tensor, Prediction], Tensor] | None = None,
    ) -> None:
        self.denoiser, self.classifier, self.scale, self.mean_shift_as_x0 = denoiser, classifier, scale, mean_shift_as_x0

    def __call__(self, x_t: Tensor, t: Tensor, abar_t: Tensor, y: Tensor | None) -> Prediction:
        pred = self.denoiser(x_t, t, abar_t, y)
        if self.scale == 0.0:
            return pred
        if y is None:
            raise ValueError("classifier guidance needs class labels y")
        if self.mean_shift_as_x0 is None and bool((abar_t == 0).any()):
            return pred
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            log_p = torch.log_softmax(self.classifier(x, t), dim=-1)
            grad = torch.autograd.grad(log_p.gather(1, y[:, None]).sum(), x)[0]
        if self.mean_shift_as_x0 is not None:
            return pred.with_output(pred.x0 + self.scale * self.mean_shift_as_x0(t, pred) * grad, "x0")
        coef = (1 - pred.abar_t).sqrt().to(grad.dtype)
        return pred.with_output(pred.eps - self.scale * coef * grad, "eps")
