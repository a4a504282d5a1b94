"""NLL in bits/dim from the variational bound (Ho et al. 2020, eq. 5), over all T timesteps or a stratified subset.

Per image x0, with 0-indexed t as in :mod:`difflab.losses` (the paper's x_1 is x_{t=0}), every term in
bits per dimension:

    L = L_T + sum_{t=1}^{T-1} L_{t-1} + L_0
    L_T     = KL(q(x_{T-1} | x0) || N(0, I))                         (prior; no network)
    L_{t-1} = E_{x_t ~ q(x_t | x0)} KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))   (the KL terms)
    L_0     = E_{x_0 ~ q(x_{t=0} | x0)} -log p(x0 | x_{t=0})            (the decoder)

Each KL term and the decoder are expectations over x_t; like improved-diffusion's ``calc_bpd_loop``,
each is estimated with one draw of x_t per image and timestep, so even the "exact" bound (all T
timesteps) is an unbiased one-sample estimate of L for each image, exact on average over images.

**Stratified estimator over K timesteps.** The T - 1 KL terms t = 1..T-1 are cut into K contiguous
strata S_k of n_k timesteps, geometric in t (:func:`strata`: single timesteps at small t, where the
terms are largest and change fastest; wide strata at large t, where they are small). For each image, one t_k is drawn
uniformly in each stratum and the KL sum is estimated by sum_k n_k L_{t_k - 1}: unbiased, since
E[n_k L_{t_k - 1}] = sum_{t in S_k} L_{t-1}, with variance sum_k n_k^2 Var_{t in S_k}(L_{t-1}) from the
draw of t (plus the one-draw noise of x_t the exact sum has too). L_0 is always computed (t = 0) and
L_T in closed form, so an image costs K + 1 network evaluations instead of T. K = T - 1 is the exact
sum (every stratum a single t). Measured on the default digits model: docs/evaluation.md.

Image i draws its strata offsets and then its noise from its own generator (seed, i)
(:class:`~difflab.seeding.PerSampleNoise`), so the value does not depend on the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from difflab.errors import ConfigError
from difflab.images import snap_to_8bit
from difflab.losses import prior_bpd
from difflab.module import DiffusionModule
from difflab.seeding import PerSampleNoise
from difflab.objectives import Prediction
from difflab.samplers import DDPM, Denoiser, Sampler
from difflab.schedule import q_sample_abar

Term = Callable[[Tensor, Prediction, Tensor], Tensor]
"""L = term(x0 (B, ...), pred at x_t, t (B,)): L_{t-1} in bits/dim (B,) for t >= 1, the decoder L_0 at t = 0."""


def strata(num_timesteps: int, num_strata: int | None = None) -> list[tuple[int, int]]:
    """K contiguous strata [lo, hi) of t = 1..T-1 with geometric edges round(T^(k/K)); None: T - 1 single timesteps.

    The edges grow geometrically (each at least one above the last, leaving room for the rest), so the
    small t, where the KL terms are largest and change fastest, get strata of one or a few timesteps.
    """
    k = num_timesteps - 1 if num_strata is None else num_strata
    if int(k) != k or not 1 <= k <= num_timesteps - 1:
        raise ValueError(
            f"the number of NLL timesteps must be an integer in [1, T - 1 = {num_timesteps - 1}] (or null: all), "
            f"got {k}"
        )
    edges = [1]
    for i in range(1, k + 1):
        edges.append(min(max(edges[-1] + 1, round(num_timesteps ** (i / k))), num_timesteps - (k - i)))
    return list(zip(edges[:-1], edges[1:]))


@dataclass(frozen=True)
class VLBTerms:
    """The bound's terms of N images, each (N,) in bits/dim; ``strata`` (N, K) are the KL sum's stratum estimates."""

    prior: Tensor
    """L_T (float64)."""
    decoder: Tensor
    """L_0 = -log p(x0 | x_{t=0})."""
    strata: Tensor
    """n_k L_{t_k - 1} for stratum k (the exact L_{t-1} where each stratum is one t); summing to :attr:`kl`."""
    bounds: list[tuple[int, int]]
    """[lo, hi) timesteps of each stratum."""

    @property
    def kl(self) -> Tensor:
        """sum_{t=1}^{T-1} L_{t-1} (estimated on the strata), (N,)."""
        return self.strata.sum(1)

    @property
    def total(self) -> Tensor:
        """The bound L = L_T + sum L_{t-1} + L_0 of each image, (N,)."""
        return self.prior + self.kl + self.decoder

    @property
    def exact(self) -> bool:
        """Whether every timestep was evaluated (each stratum a single t)."""
        return all(hi - lo == 1 for lo, hi in self.bounds)

    def summary(self) -> dict[str, float]:
        """Means over the images: nll_bpd (with its standard error), nll_prior_bpd, nll_kl_bpd, nll_decoder_bpd."""
        total = self.total.double()
        n = total.numel()
        return {
            "nll_bpd": float(total.mean()),
            "nll_bpd_stderr": float(total.std() / math.sqrt(n)) if n > 1 else float("nan"),
            "nll_prior_bpd": float(self.prior.double().mean()),
            "nll_kl_bpd": float(self.kl.double().mean()),
            "nll_decoder_bpd": float(self.decoder.double().mean()),
        }


@torch.no_grad()
def variational_bound(
    predict: Denoiser,
    term: Term,
    x0: Tensor,
    alphas_cumprod: Tensor,
    y: Tensor | None = None,
    num_strata: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    first_index: int = 0,
) -> VLBTerms:
    """The bound's terms for images x0 (N, ...) under the reverse model ``predict`` (module docstring).

    ``predict(x_t, t, abar_t, y)`` gives the Prediction the reverse step p(x_{t-1} | x_t) is built from,
    ``term`` turns it into L_{t-1} or L_0. ``alphas_cumprod`` float64 (T,); y (N,) or None.
    ``num_strata``: K, or None for all T - 1 KL terms (exact). ``batch_size`` (image, t) pairs per
    network call. Image i draws from generator (seed, first_index + i).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    alphas_cumprod = alphas_cumprod.to(x0.device)
    bounds = strata(alphas_cumprod.numel(), num_strata)
    lo = torch.tensor([b[0] for b in bounds])
    size = torch.tensor([b[1] - b[0] for b in bounds])
    k = len(bounds)
    decoder = x0.new_empty(x0.shape[0])
    kl = x0.new_empty(x0.shape[0], k)
    per_block = max(1, batch_size // (k + 1))
    for start in range(0, x0.shape[0], per_block):
        stop = min(start + per_block, x0.shape[0])
        generators = PerSampleNoise.for_indices(seed, range(first_index + start, first_index + stop)).generators
        offsets = torch.stack([torch.rand(k, generator=g, dtype=torch.float64) for g in generators])
        t = torch.cat([torch.zeros(stop - start, 1, dtype=torch.long), lo + (offsets * size).long()], 1)
        eps = torch.stack([torch.randn((k + 1, *x0.shape[1:]), generator=g, dtype=x0.dtype) for g in generators])
        t, eps = t.flatten().to(x0.device), eps.flatten(0, 1).to(x0.device)
        images = x0[start:stop].repeat_interleave(k + 1, 0)
        labels = None if y is None else y[start:stop].to(x0.device).repeat_interleave(k + 1, 0)
        out = torch.empty(t.shape[0], dtype=x0.dtype, device=x0.device)
        for s in range(0, t.shape[0], batch_size):
            part = slice(s, s + batch_size)
            abar_t = alphas_cumprod[t[part]]
            x_t = q_sample_abar(images[part], abar_t.view(-1, *([1] * (x0.ndim - 1))), eps[part])
            pred = predict(x_t, t[part], abar_t, None if labels is None else labels[part])
            out[part] = term(images[part], pred, t[part])
        out = out.view(stop - start, k + 1)
        decoder[start:stop] = out[:, 0]
        kl[start:stop] = out[:, 1:] * size.to(out)
    prior = prior_bpd(x0.double(), alphas_cumprod[-1])  # float64: in float32 the KL of ~1e-5 loses 1e-3 of itself
    return VLBTerms(prior=prior, decoder=decoder, strata=kl, bounds=bounds)


def check_supported(module: DiffusionModule) -> None:
    """Refuse (ConfigError) a model whose bits/dim this module cannot compute; the one place such checks live.

    The bound here is that of pixel-space data on the 8-bit grid under isotropic Gaussian noise.
    Shaped noise (a ``module.noise`` that is not the identity) would need the change of variables
    to whitened coordinates; latent models have no pixel likelihood from the diffusion alone.
    """
    noise = getattr(module, "noise", None)
    if noise is not None and not noise.is_identity:
        raise ConfigError(
            f"metrics=[nll] is not supported for a model trained with {noise.option}: its bits/dim need the change of "
            "variables to whitened coordinates, which difflab does not compute; evaluate fid / kid only"
        )
    if getattr(module, "latent", None) is not None:
        raise ConfigError(
            "metrics=[nll] is not supported for a latent-space model (latent=vae): the bound is over the VAE's latents, "
            "and the pixels' bits/dim would need the decoder's likelihood too; evaluate fid / kid only"
        )


def nll_sampler(module: DiffusionModule, sampler: Sampler | None) -> DDPM:
    """The reverse variance of the bound: ``sampler``'s if a DDPM (auto | beta_tilde | beta | learned), else auto.

    Fails (ConfigError) for ``variance=learned`` on a model that does not learn its variance.
    """
    ddpm = sampler if isinstance(sampler, DDPM) else DDPM(variance="auto")
    if ddpm.variance == "learned" and not module.net.learn_variance:
        raise ConfigError(
            "sampler.variance=learned needs a model trained with a learned variance (loss=hybrid); this one has a "
            "fixed variance: use auto, beta_tilde or beta"
        )
    return ddpm


def variance_name(module: DiffusionModule, sampler: DDPM) -> str:
    """The reverse variance ``sampler`` gives this model: beta_tilde, beta or learned (auto resolved)."""
    if sampler.variance == "auto":
        return "learned" if module.net.learn_variance else "beta_tilde"
    return sampler.variance


def bits_per_dim(
    module: DiffusionModule,
    x0: Tensor,
    y: Tensor | None = None,
    sampler: Sampler | None = None,
    num_strata: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    use_ema: bool = True,
) -> VLBTerms:
    """The bound's terms in bits/dim for images x0 (N, C, H, W) in [-1, 1] under ``module`` (module docstring).

    x0 is first rounded to the 8-bit grid the discretised decoder L_0 assumes (256 levels per
    channel). The reverse variance is :func:`nll_sampler`'s. A class-conditional model is
    evaluated as p(x | y) with the labels y (N,), no guidance. ``use_ema``: the EMA weights. With
    self-conditioning the network first runs without it, then conditioned on its own x0_hat at the
    same x_t (the two passes of training's self-conditioned half), so p(x_{t-1} | x_t) depends on x_t only.
    """
    check_supported(module)
    ddpm = nll_sampler(module, sampler)
    if module.num_classes and y is None:
        raise ValueError("a class-conditional model's bits/dim need the images' labels y")
    net = module.ema.module if use_ema else module.net
    mode = net.training
    net.eval()

    def predict(x_t: Tensor, t: Tensor, abar_t: Tensor, labels: Tensor | None) -> Prediction:
        denoiser = module.denoiser(net)  # a fresh one: no self-conditioning state from another batch
        pred = denoiser(x_t, t, abar_t, labels)
        return denoiser(x_t, t, abar_t, labels) if net.self_condition else pred

    try:
        return variational_bound(
            predict, lambda x, pred, t: module.vlb(x, pred, t, ddpm), snap_to_8bit(x0.to(module.device)),
            module.schedule.alphas_cumprod, y if module.num_classes else None, num_strata, seed, batch_size,
        )
    finally:
        net.train(mode)
