"""python -m difflab.noise_report dataset=digits noise=covariance: spectra that make the low-rank argument checkable.

Fits the ``noise`` option on the dataset's training split as a model sees it (one epoch of the
training loader, augmentation included) and writes into the run dir:

- ``noise_report.png``: (1) heat-maps of the data covariance Sigma, the model's C and the empirical
  covariance of ``num_draws`` noise draws; (2) sorted eigenvalue spectra of the data, iid noise,
  shaped noise and whitened data A^{-1} (x - mu) (flat at 1 when C = Sigma), each annotated with
  its participation ratio PR = (sum lambda)^2 / sum lambda^2 and effective rank exp(H(lambda / sum lambda))
  (the exponential of the spectral entropy, Roy & Vetterli 2007); (3) iid noise z beside shaped noise A z;
- ``noise_report.json``: those numbers; ``noise.safetensors``: the fitted statistics.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor

from difflab.build import instantiate_node
from difflab.data.base import training_batches
from difflab.errors import ConfigError
from difflab.images import make_grid, to_uint8
from difflab.noise import ShapedNoise, effective_rank, participation_ratio

CONF = Path(__file__).resolve().parents[3] / "conf"
MAX_DIM = 4096
"""The report eigendecomposes dense (n, n) covariances."""


def second_moment(rows: Tensor) -> Tensor:
    """(1/N) sum_i r_i r_i^T (n, n), float64: the covariance of zero-mean draws (N, n) with the mean known."""
    rows = rows.double()
    return rows.T @ rows / rows.shape[0]


def spectrum(cov: Tensor) -> dict[str, Any]:
    """Eigenvalues (descending, clipped at 0), participation ratio and effective rank of a covariance (n, n)."""
    lam = torch.linalg.eigvalsh(cov).flip(0).clamp(min=0)
    return {"eigenvalues": lam, "pr": participation_ratio(lam), "effective_rank": effective_rank(lam)}


def noise_report(cfg: DictConfig) -> dict[str, Any]:
    """Fit ``cfg.noise`` on ``cfg.dataset``'s training split, print the spectra's numbers, write the figure."""
    for key in ("num_draws", "num_examples", "heatmap_dims"):
        if int(cfg[key]) != cfg[key] or cfg[key] < 2:
            raise ConfigError(f"{key} must be an integer >= 2, got {cfg[key]}")
    torch.manual_seed(cfg.seed)  # the training loader's shuffle and flips
    datamodule = instantiate_node(cfg.dataset, "dataset")
    batches = training_batches(datamodule)
    shape = tuple(batches[0].shape[1:])
    n = math.prod(shape)
    if n > MAX_DIM:
        raise ConfigError(
            f"noise_report eigendecomposes dense n x n covariances, n <= {MAX_DIM}; images of shape {shape} have "
            f"n = {n}: lower dataset.resolution"
        )
    noise: ShapedNoise = instantiate_node(cfg.noise, "noise", shape=shape)
    noise.check_num_samples(sum(len(x) for x in batches))
    noise.fit(batches)

    data = torch.cat(batches).double()
    z = torch.randn(cfg.num_draws, *shape, generator=torch.Generator().manual_seed(cfg.seed), dtype=torch.float64)
    draws = noise.color(z)
    model_cov = noise.covariance()
    empirical = second_moment(draws.flatten(1))
    spectra = {
        "data": spectrum(torch.cov(data.flatten(1).T)),
        "iid noise": spectrum(second_moment(z.flatten(1))),
        "shaped noise": spectrum(empirical),
        "model C": spectrum(model_cov),
        "whitened data": spectrum(torch.cov(noise.whiten(data).flatten(1).T)),
    }
    rel_error = float(torch.linalg.matrix_norm(empirical - model_cov) / torch.linalg.matrix_norm(model_cov))
    expected = math.sqrt((spectra["model C"]["pr"] + 1) / cfg.num_draws)
    numbers = {
        "noise": noise.option, "config": noise.config(), "shape": list(shape), "n": n, "num_images": len(data),
        "num_draws": int(cfg.num_draws), "log_abs_det_A": float(noise.log_abs_det()),
        "empirical_rel_error": rel_error, "expected_rel_error": expected,
        "spectra": {k: {"pr": v["pr"], "effective_rank": v["effective_rank"]} for k, v in spectra.items()},
    }

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = plot_report(noise, data, z[: cfg.num_examples], draws[: cfg.num_examples], model_cov, empirical, spectra,
                         numbers, int(cfg.heatmap_dims))
    png = out / "noise_report.png"
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=cfg.dpi)
    # a 256-colour palette: the same figure at a third of the bytes (heat-maps of noisy covariances compress badly)
    Image.open(buffer).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
    (out / "noise_report.json").write_text(json.dumps(numbers, indent=2) + "\n")
    noise.save(out / "noise.safetensors")
    _print_numbers(numbers, png)
    return {**numbers, "png": png}


def _print_numbers(numbers: dict[str, Any], png: Path) -> None:
    lines = [
        f"{numbers['noise']} on images of shape {tuple(numbers['shape'])} (n = {numbers['n']}), "
        f"{numbers['num_images']} training images, {numbers['num_draws']} noise draws",
        f"{'spectrum':<15}{'PR':>10}{'eff. rank':>12}   (PR = (sum l)^2 / sum l^2; eff. rank = exp(spectral entropy))",
    ]
    lines += [f"{k:<15}{v['pr']:>10.2f}{v['effective_rank']:>12.2f}" for k, v in numbers["spectra"].items()]
    lines += [
        f"||C_hat - C||_F / ||C||_F = {numbers['empirical_rel_error']:.4f} over the draws "
        f"(sqrt((PR + 1) / N) = {numbers['expected_rel_error']:.4f})",
        f"log|det A| = {numbers['log_abs_det_A']:.2f}",
        f"figure:      {png}",
    ]
    print("\n".join(lines), flush=True)


def _heatmap(ax: Any, cov: Tensor, dims: int, title: str, norm: Normalize) -> Any:
    shown = cov[:dims, :dims].cpu().numpy()
    image = ax.imshow(shown, cmap="RdBu_r", norm=norm, interpolation="nearest")
    crop = f"\n(first {dims} of {cov.shape[0]} dims)" if dims < cov.shape[0] else ""
    ax.set_title(title + crop, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return image


def _display(images: Tensor, rms_range: bool) -> Tensor:
    """Images for a grid in [-1, 1]: as they are (data), or noise scaled so +-3 rms spans the range."""
    images = images.double()
    if rms_range:
        images = images / (3 * images.square().mean().sqrt())
    return images.clamp(-1, 1)


def plot_report(
    noise: ShapedNoise, data: Tensor, z: Tensor, draws: Tensor, model_cov: Tensor, empirical: Tensor,
    spectra: dict[str, dict[str, Any]], numbers: dict[str, Any], heatmap_dims: int,
) -> Figure:
    """The three panels: covariance heat-maps, eigenvalue spectra, and a grid of data / iid z / shaped A z."""
    figure = Figure(figsize=(15, 9.5), layout="constrained")
    grid = figure.add_gridspec(2, 3, height_ratios=[1, 1.15])
    data_cov = torch.cov(data.flatten(1).T)
    dims = min(heatmap_dims, data_cov.shape[0])
    limit = float(max(data_cov[:dims, :dims].abs().max(), model_cov[:dims, :dims].abs().max()))
    norm = Normalize(-limit, limit)
    heatmaps = (
        (data_cov, f"data covariance $\\Sigma$ ({numbers['num_images']} training images)"),
        (model_cov, f"model $C = AA^T$ ({noise.option})"),
        (empirical, f"empirical cov. of {numbers['num_draws']} draws $Az$\n"
                    f"$\\|\\hat C - C\\|_F / \\|C\\|_F$ = {numbers['empirical_rel_error']:.3f}"),
    )
    axes = [figure.add_subplot(grid[0, i]) for i in range(3)]
    for ax, (cov, title) in zip(axes, heatmaps):
        image = _heatmap(ax, cov, dims, title, norm)
    figure.colorbar(image, ax=axes, shrink=0.85, label="covariance")

    ax = figure.add_subplot(grid[1, :2])
    styles = {
        "data": dict(color="black", lw=2), "iid noise": dict(color="0.55", lw=1.5),
        "shaped noise": dict(color="tab:blue", lw=1.5), "model C": dict(color="tab:blue", lw=1, ls="--"),
        "whitened data": dict(color="tab:orange", lw=2),
    }
    top = max(float(s["eigenvalues"][0]) for s in spectra.values())
    bottom = top * 1e-7
    for name, s in spectra.items():
        lam = s["eigenvalues"].clamp(min=bottom).cpu().numpy()
        label = f"{name}: PR {s['pr']:.1f}, eff. rank {s['effective_rank']:.1f}"
        ax.plot(range(1, len(lam) + 1), lam, label=label, **styles[name])
    ax.axhline(1.0, color="0.8", lw=0.8, zorder=0)
    ax.set_yscale("log")
    ax.set_ylim(bottom * 0.5, top * 2)
    ax.set_xlabel("eigenvalue index (sorted)")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"covariance spectra, n = {numbers['n']} (eff. rank = exp of spectral entropy; values < {bottom:.0e} "
                 "drawn at that level)", fontsize=10)
    ax.legend(fontsize=9, loc="lower left")
    ax.grid(True, which="major", alpha=0.3)

    ax = figure.add_subplot(grid[1, 2])
    groups = (
        ("data", _display(data[: len(z)], False)),
        ("iid $z$", _display(z, True)),
        ("shaped $Az$", _display(draws, True)),
    )
    per_row = math.ceil(math.sqrt(len(z) * 3))  # the three groups together near square
    per_row = math.ceil(len(z) / math.ceil(len(z) / per_row))
    blocks = [make_grid(to_uint8(images), nrow=per_row, padding=1) for _, images in groups]
    gap = 255 * np.ones((4, blocks[0].shape[1], blocks[0].shape[2]), dtype=np.uint8)
    tiles = np.concatenate([blocks[0], gap, blocks[1], gap, blocks[2]])
    ax.imshow(tiles[..., 0] if tiles.shape[-1] == 1 else tiles, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([(blocks[0].shape[0] + 4) * (i + 0.5) for i in range(3)], [name for name, _ in groups])
    ax.set_xticks([])
    ax.set_title("samples; the noise blocks use the same $z$, each\nscaled so that $\\pm$3 rms spans black to white",
                 fontsize=10)
    return figure


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="noise_report")
def main(cfg: DictConfig) -> None:
    noise_report(cfg)


if __name__ == "__main__":
    main()
