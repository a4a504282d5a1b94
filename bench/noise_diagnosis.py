"""Shaped-noise diagnosis (issue #19): where in the data's spectrum a trained denoiser errs, and what its samples lack.

    python -m bench.noise_diagnosis RUN [RUN ...] [--timesteps 10,50,100,200,400,600,800,950] [--num-images 512]
        [--num-samples 899] [--settings ancestral:50,ddim:50] [--bands 1-4,5-16,17-64,65-256] [--json OUT.json]

RUN is a train.py run dir or .ckpt (EMA weights). For each run:

1. the Gaussian of the training data as the model saw it (``module.diffusion_data`` of every training image, the
   stream the noise was fitted on): mean m, covariance Sigma = U diag(lambda) U^T (float64, lambda descending),
   its eigen-directions grouped into ``--bands`` (1-based, inclusive; the 16x16 digits have rank <= 64, so 65-256
   are directions the data never varies in);
2. on ``--num-images`` held-out images (the validation split) with one fixed z per image, x_t formed as training
   forms it, at every ``--timesteps`` t, per band: the x0 error per dimension of the network and of the exact
   Gaussian denoiser (the best linear one; on Gaussian data the irreducible error) in data coordinates, U^T (x0_hat -
   x0), and their ratio; the z error (the training loss) per dimension in whitened coordinates along U, with each
   band's share of the loss; the SNR abar lambda_i / ((1 - abar) c_i), c_i = u_i^T C u_i, averaged over the band.
   U is the noise's own eigenbasis where C shares Sigma's (iid, covariance, lowrank); for any noise it is the
   orthonormal basis nearest (Loewdin) the whitened directions A^T u_i, the polar factor of A U, as every A is a
   symmetric root. The 65-256 band of the digits has no data variance: the exact denoiser's error there is 0 up to
   rounding, so its ratio is meaningless (read the learned error itself);
3. ``--num-samples`` samples of every ``--settings`` (sample.py's code path, through bench.quality_per_compute's
   draw; clamped to [-1, 1]), projected on U: per band the variance ratio samples / data (band sums) and the RMS mean
   shift u_i^T (mean(samples) - m); the Frechet distance to the training images in 8x8 pixel space (bench.common).

Markdown tables on stdout; every number (per direction too) in ``--json``. Pixel-space models only (the samples
are compared with the data the Gaussian was fitted to), n <= 4096 (dense eigendecompositions).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from bench.common import frechet_distance
from bench.quality_per_compute import draw
from difflab.build import instantiate_node, load_checkpoint
from difflab.data.base import training_batches
from difflab.module import DiffusionModule
from difflab.noise import ShapedNoise
from difflab.noise.gaussian import exact_denoiser, posterior_x0_covariance
from difflab.objectives import Prediction
from difflab.schedule import q_sample_abar
from difflab.summarize import markdown

MAX_DIM = 4096
"""Sigma, C and A are dense (n, n)."""
Band = tuple[int, int]
"""Eigen-directions [start, stop) in 0-based order of decreasing data variance."""


# -- the math (pure torch, float64) --------------------------------------------------------------------------------


def parse_bands(spec: str, n: int) -> list[Band]:
    """``"1-4,5-16,..."`` (1-based, inclusive) -> [(0, 4), (4, 16), ...] clipped to n; bands starting past n dropped."""
    bands = []
    for part in spec.split(","):
        first, sep, last = part.partition("-")
        if not sep or not first.isdigit() or not last.isdigit() or not 1 <= int(first) <= int(last):
            raise ValueError(f"a band is FIRST-LAST with 1 <= FIRST <= LAST, got {part!r} in --bands {spec}")
        if int(first) <= n:
            bands.append((int(first) - 1, min(int(last), n)))
    return bands


def band_label(band: Band) -> str:
    """The 1-based inclusive name of a band: (0, 4) -> "1-4"."""
    return f"{band[0] + 1}-{band[1]}"


def band_means(values: Tensor, bands: list[Band]) -> Tensor:
    """(1 / |b|) sum_{i in b} v_i for every band: values (..., n) -> (..., len(bands))."""
    return torch.stack([values[..., lo:hi].mean(-1) for lo, hi in bands], -1)


def band_sums(values: Tensor, bands: list[Band]) -> Tensor:
    """sum_{i in b} v_i for every band: values (..., n) -> (..., len(bands))."""
    return torch.stack([values[..., lo:hi].sum(-1) for lo, hi in bands], -1)


@dataclass(frozen=True)
class DataGaussian:
    """N(m, Sigma) of a data set, Sigma = U diag(lambda) U^T; float64."""

    mean: Tensor
    """m (C, H, W)."""
    sigma: Tensor
    """Sigma (n, n)."""
    lam: Tensor
    """lambda (n,), descending, clipped at 0."""
    u: Tensor
    """U (n, n), column i the i-th eigen-direction."""


def fit_gaussian(x: Tensor) -> DataGaussian:
    """m = mean of x (N, C, H, W), Sigma = its covariance (1 / (N - 1), as the noise's fit), eigh sorted descending."""
    flat = x.flatten(1).double()
    sigma = torch.cov(flat.T)
    lam, u = torch.linalg.eigh(sigma)
    return DataGaussian(flat.mean(0).view(x.shape[1:]), sigma, lam.flip(0).clamp(min=0), u.flip(1))


def directional_variance(cov: Tensor, basis: Tensor) -> Tensor:
    """b_i^T Cov b_i for every column b_i of ``basis`` (n, k): (k,)."""
    return ((cov @ basis) * basis).sum(0)


def direction_snr(lam: Tensor, c: Tensor, abar: float) -> Tensor:
    """SNR_i = abar lambda_i / ((1 - abar) c_i) of the process along each data eigen-direction (n,)."""
    return abar * lam / ((1 - abar) * c)


def projected_mse(errors: Tensor, basis: Tensor) -> Tensor:
    """E[(b_i^T e)^2] over the rows e of ``errors`` (N, n), for every column b_i of ``basis`` (n, k): (k,)."""
    return (errors.double() @ basis).square().mean(0)


def loss_shares(z_mse: Tensor, bands: list[Band]) -> Tensor:
    """Each band's share of E||z - z_hat||^2 = sum_i E[(w_i^T (z - z_hat))^2], w_i orthonormal: (len(bands),)."""
    return band_sums(z_mse, bands) / z_mse.sum()


def exact_prediction(noise: ShapedNoise, data: DataGaussian, y_t: Tensor, abar: Tensor) -> Prediction:
    """The exact denoiser of ``data`` at the sampler's state y_t (B, C, H, W), one abar (B, 1, 1, 1), as an eps
    Prediction: z* = K (A y_t - sqrt(abar) (m - mu)) (:func:`~difflab.noise.gaussian.exact_denoiser`), float64."""
    z = exact_denoiser(data.sigma, data.mean, noise, abar.flatten()[0])(noise.color(y_t.double()))
    return Prediction(z, "eps", y_t.double(), abar)


# -- the glue ------------------------------------------------------------------------------------------------------


def load_run(run: str) -> tuple[DiffusionModule, Any]:
    """The checkpoint's module (eval mode) and its dataset as train.py built it."""
    module = load_checkpoint(run).eval()
    if module.latent is not None:
        raise SystemExit(f"{run} is a latent-space model: the diagnosis compares samples with the data in pixel space")
    config = module.hparams["run_config"]
    datamodule = instantiate_node(OmegaConf.create(config["dataset"]), "dataset", seed=config["seed"])
    return module, datamodule


def held_out(module: DiffusionModule, datamodule: Any, count: int) -> tuple[Tensor, Tensor | None]:
    """The first ``count`` validation images as the process sees them (N, C, H, W) and their conditioning or None."""
    datamodule.setup("fit")
    batches = list(datamodule.val_dataloader())
    x0 = torch.cat([module.diffusion_data(b[0]) for b in batches])[:count]
    conditions = [module.conditioning.condition(b) for b in batches]
    return x0, None if conditions[0] is None else torch.cat(conditions)[:count]


@torch.no_grad()
def denoiser_errors(
    module: DiffusionModule, x0: Tensor, labels: Tensor | None, z: Tensor, t: int, data: DataGaussian
) -> dict[str, Tensor]:
    """Per-direction errors (n,) at timestep t of the EMA network and of the exact Gaussian denoiser on x0 (N, C, H, W).

    x_t is formed as in :meth:`DiffusionModule.losses` (y0 = A^-1 (x0 - mu), y_t = sqrt(abar) y0 + sqrt(1 - abar) z);
    both denoisers' z estimates go through the same conversion to x0_hat = A y0_hat + mu. Both errors are projected on
    the data's U (the z error in whitened coordinates: see the module docstring).
    """
    noise = module.noise
    t_batch = torch.full((len(x0),), t, dtype=torch.long)
    abar = module.schedule.abar(t_batch, x0.ndim)
    y_t = q_sample_abar(noise.from_data(x0), abar, z)
    learned = module.denoiser(module.ema.module)(y_t, t_batch, abar, labels)
    exact = exact_prediction(noise, data, y_t, abar)
    posterior = posterior_x0_covariance(data.sigma, noise.covariance(), abar.flatten()[0])
    return {
        "x0_learned": projected_mse((noise.to_data(learned.x0) - x0).flatten(1), data.u),
        "x0_exact": projected_mse((noise.to_data(exact.x0) - x0).flatten(1), data.u),
        "x0_analytic": directional_variance(posterior, data.u),
        "z_learned": projected_mse((learned.eps - z).flatten(1), data.u),
        "z_exact": projected_mse((exact.eps - z).flatten(1), data.u),
    }


def sample_spectrum(images: Tensor, data: DataGaussian, bands: list[Band]) -> dict[str, Any]:
    """Samples (N, C, H, W) projected on U, p = U^T (x - m): per band the variance ratio sum Var(p_i) / sum lambda_i
    and the RMS mean shift sqrt(mean_i E[p_i]^2); per direction Var(p_i) and E[p_i]."""
    p = (images.flatten(1).double() - data.mean.flatten()) @ data.u
    variance, shift = p.var(0), p.mean(0)
    return {
        "variance_ratio": (band_sums(variance, bands) / band_sums(data.lam, bands)).tolist(),
        "variance_per_dim": band_means(variance, bands).tolist(),
        "mean_shift_rms": band_means(shift.square(), bands).sqrt().tolist(),
        "directions": {"variance": variance.tolist(), "mean_shift": shift.tolist()},
    }


def diagnose(run: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every number of one run (module docstring), as JSON-able values."""
    module, datamodule = load_run(run)
    noise, n = module.noise, module.noise.dim
    if n > MAX_DIM:
        raise SystemExit(f"{run}: samples of shape {noise.shape} have n = {n} > {MAX_DIM} (dense eigendecompositions)")
    train = torch.cat([module.diffusion_data(b) for b in training_batches(datamodule)])
    data = fit_gaussian(train)
    c = directional_variance(noise.covariance(), data.u)
    bands = parse_bands(args.bands, n)
    if not all(0 <= t < module.schedule.num_timesteps for t in args.timesteps):
        raise SystemExit(f"--timesteps must lie in [0, {module.schedule.num_timesteps}), got {args.timesteps}")
    x0, labels = held_out(module, datamodule, args.num_images)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    result: dict[str, Any] = {
        "run": run, "noise": noise.option, "objective": module.objective, "n": n, "num_train": len(train),
        "num_held_out": len(x0), "bands": [band_label(b) for b in bands], "eigenvalues": data.lam.tolist(),
        "data_variance_per_dim": band_means(data.lam, bands).tolist(), "noise_variance": c.tolist(), "timesteps": [],
        "samples": [],
    }
    for t in args.timesteps:
        abar = float(module.schedule.alphas_cumprod[t])
        errors = denoiser_errors(module, x0, labels, z, t, data)
        errors["snr"] = direction_snr(data.lam, c, abar)
        per_band = {k: band_means(v, bands).tolist() for k, v in errors.items()}
        per_band["x0_ratio"] = [a / b for a, b in zip(per_band["x0_learned"], per_band["x0_exact"])]
        per_band["loss_share"] = loss_shares(errors["z_learned"], bands).tolist()
        result["timesteps"].append({
            "t": t, "abar": abar, "bands": per_band, "all": {k: float(v.mean()) for k, v in errors.items()},
            "directions": {k: v.tolist() for k, v in errors.items()},
        })
    for setting in args.settings.split(","):
        images, _ = draw(run, setting, args.num_samples, args.seed)
        spectrum = sample_spectrum(images, data, bands)
        result["samples"].append({"setting": setting, "fd": frechet_distance(images, train.float()), **spectrum})
    return result


def tables(result: dict[str, Any]) -> str:
    """The run's numbers as markdown: x0 error, z error and loss share, SNR, samples' spectrum."""
    bands = result["bands"]
    steps = result["timesteps"]
    lines = [
        f"## {result['run']}: {result['noise']}, objective={result['objective']}, n = {result['n']}, "
        f"{result['num_train']} training / {result['num_held_out']} held-out images\n",
        "x0 error per dimension in data coordinates, U^T (x0_hat - x0): learned / exact Gaussian (ratio)\n",
        markdown(["t", "abar", *bands, "all"], [
            [s["t"], s["abar"], *(f"{a:.3g} / {b:.3g} ({r:.3g})" for a, b, r in
                                  zip(s["bands"]["x0_learned"], s["bands"]["x0_exact"], s["bands"]["x0_ratio"])),
             f"{s['all']['x0_learned']:.3g} / {s['all']['x0_exact']:.3g}"]
            for s in steps
        ]),
        "z error per dimension in whitened coordinates: learned / exact Gaussian (the band's share of the loss)\n",
        markdown(["t", *bands, "all (the loss)"], [
            [s["t"], *(f"{a:.3g} / {b:.3g} ({100 * f:.0f}%)" for a, b, f in
                       zip(s["bands"]["z_learned"], s["bands"]["z_exact"], s["bands"]["loss_share"])),
             f"{s['all']['z_learned']:.3g} / {s['all']['z_exact']:.3g}"]
            for s in steps
        ]),
        "SNR abar lambda_i / ((1 - abar) c_i), mean over the band\n",
        markdown(["t", "abar", *bands], [[s["t"], s["abar"], *s["bands"]["snr"]] for s in steps]),
        "samples' variance per dimension along U: samples / data (ratio); Frechet distance to the training images\n",
        markdown(["setting", "FD (8x8 pixels)", *bands], [
            [s["setting"], s["fd"], *(f"{v:.3g} / {d:.3g} ({r:.3g})" for v, d, r in
                                      zip(s["variance_per_dim"], result["data_variance_per_dim"], s["variance_ratio"]))]
            for s in result["samples"]
        ]),
        "samples' mean shift along U: sqrt(mean over the band of (u_i^T (mean(samples) - m))^2)\n",
        markdown(["setting", *bands], [[s["setting"], *s["mean_shift_rms"]] for s in result["samples"]]),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="train.py run dirs or .ckpt files")
    parser.add_argument("--timesteps", default="10,50,100,200,400,600,800,950",
                        type=lambda s: [int(t) for t in s.split(",")])
    parser.add_argument("--num-images", type=int, default=512, help="held-out images (at most the validation split)")
    parser.add_argument("--num-samples", type=int, default=899)
    parser.add_argument("--settings", default="ancestral:50,ddim:50", help="comma-separated SAMPLER:STEPS[:SPACING]")
    parser.add_argument("--bands", default="1-4,5-16,17-64,65-256", help="1-based inclusive ranks of eigen-directions")
    parser.add_argument("--seed", type=int, default=0, help="of the fixed z and of the samples")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()
    results = []
    for run in args.runs:
        results.append(diagnose(run, args))
        print(tables(results[-1]), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"numbers: {args.json}")


if __name__ == "__main__":
    main()
