"""Guidance as wrappers around ``eps = denoiser(x_t, t, y)``: every sampler gets it without change.

Classifier-free guidance (Ho & Salimans 2022): eps = eps_u + w (eps_c - eps_u), so w = 1 is the
plain conditional model and w = 0 the unconditional one. Classifier guidance (Dhariwal & Nichol
2021): the DDPM mean moves by s Sigma grad_x log p_phi(y | x_t, t); for other samplers
eps = eps_theta - s sqrt(1 - abar_t) grad_x log p_phi(y | x_t, t).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from difflab.samplers import Denoiser
from difflab.samplers.ddpm import ddpm_variance


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

    The conditional and unconditional passes run as one batched forward of 2B. w = 1 and w = 0
    return exactly one pass. ``rescale`` (phi of Lin et al. 2023, eq. 15-16) mixes in the guided
    eps rescaled to the conditional eps's per-sample std; 0 disables it.
    """

    def __init__(self, denoiser: Denoiser, scale: float, null_label: int, rescale: float = 0.0) -> None:
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must lie in [0, 1], got {rescale}")
        self.denoiser, self.scale, self.null_label, self.rescale = denoiser, scale, null_label, rescale

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        null = torch.full_like(y, self.null_label)
        if self.scale == 1.0:
            return self.denoiser(x_t, t, y)
        if self.scale == 0.0:
            return self.denoiser(x_t, t, null)
        eps_c, eps_u = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        eps = eps_u + self.scale * (eps_c - eps_u)
        if self.rescale > 0:
            dims = tuple(range(1, eps.ndim))
            rescaled = eps * (eps_c.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
            eps = self.rescale * rescaled + (1 - self.rescale) * eps
        return eps


class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021) with g = grad_x log p_phi(y | x_t, t).

    For DDIM and any other eps-sampler (their Algorithm 2): eps = eps_theta - s sqrt(1 - abar_t) g.
    For DDPM (``ddpm_pairs`` given, with the sampler's ``variance``), their Algorithm 1: the reverse
    mean moves by s Sigma g, Sigma the step's variance (beta or beta~ of the respaced step t -> t'),
    done by moving eps by -s Sigma g sqrt(alpha) sqrt(1 - abar_t) / beta (eq. 11 solved for eps).
    s = 0 returns the denoiser's eps untouched.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        classifier: Callable[[Tensor, Tensor], Tensor],
        scale: float,
        alphas_cumprod: Tensor,
        ddpm_pairs: Sequence[tuple[int, int]] | None = None,
        variance: str = "beta_tilde",
    ) -> None:
        self.denoiser, self.classifier, self.scale, self.alphas_cumprod = denoiser, classifier, scale, alphas_cumprod
        self.variance = variance
        self.prev = None  # t -> t' of the DDPM grid
        if ddpm_pairs is not None:
            self.prev = torch.full((len(alphas_cumprod),), -1, dtype=torch.long, device=alphas_cumprod.device)
            for t, t_prev in ddpm_pairs:
                self.prev[t] = t_prev

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        eps = self.denoiser(x_t, t, y)
        if self.scale == 0.0:
            return eps
        if y is None:
            raise ValueError("classifier guidance needs class labels y")
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            log_p = torch.log_softmax(self.classifier(x, t), dim=-1)
            grad = torch.autograd.grad(log_p.gather(1, y[:, None]).sum(), x)[0]
        abar_t = self.alphas_cumprod[t]
        if self.prev is None:
            coef = (1 - abar_t).sqrt()
        else:
            t_prev = self.prev[t]
            abar_prev = torch.where(t_prev >= 0, self.alphas_cumprod[t_prev.clamp(min=0)], torch.ones_like(abar_t))
            alpha = abar_t / abar_prev
            coef = ddpm_variance(abar_t, abar_prev, self.variance) * alpha.sqrt() * (1 - abar_t).sqrt() / (1 - alpha)
        return eps - self.scale * coef.to(eps.dtype).view(-1, *([1] * (eps.ndim - 1))) * grad
