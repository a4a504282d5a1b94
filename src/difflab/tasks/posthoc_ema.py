"""python -m difflab.posthoc_ema run=DIR sigma_rel=S: the EMA of any width, fitted to a run's post-hoc EMA snapshots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from difflab.build import read_checkpoint
from difflab.callbacks.posthoc_ema import SNAPSHOT_DIR, read_snapshots
from difflab.checkpointing import atomic_write, checkpoint_nbytes
from difflab.ema import sigma_rel_to_gamma, solve_posthoc_coefficients
from difflab.errors import ConfigError

CONF = Path(__file__).resolve().parents[3] / "conf"
RANGE_FACTOR = 2.0
"""A target sigma_rel may lie from the smallest tracked width / 2 to the largest x 2 (EDM2 reconstructs well within
about [0.03, 0.2] from 0.05 and 0.10; the toy test measures the error there)."""


def reconstructable_range(sigma_rels: list[float]) -> tuple[float, float]:
    """The sigma_rel a fit over profiles of ``sigma_rels`` is trusted for."""
    return min(sigma_rels) / RANGE_FACTOR, max(sigma_rels) * RANGE_FACTOR


def posthoc_ema(cfg: DictConfig) -> Path:
    """Write a copy of ``<cfg.run>/checkpoints/last.ckpt`` whose EMA weights are the power-function EMA of width
    ``cfg.sigma_rel`` at its step, fitted by least squares (EDM2 Algorithm 3) to the snapshots up to that step and
    the tracked EMAs the checkpoint holds; returns its path (``cfg.out``, default
    ``<run>/checkpoints/posthoc_ema_<sigma_rel>.ckpt``)."""
    run = Path(cfg.run).expanduser()
    ckpt, _ = read_checkpoint(run, "train")
    sigma_rel = float(cfg.sigma_rel)
    state = ckpt.get("callbacks", {}).get("PostHocEMA") or {}
    how = (
        "train with the post-hoc EMA callback (on by default: callbacks.posthoc_ema in conf/callbacks/default.yaml; "
        "callbacks.posthoc_ema.every_n_steps=N sets the snapshot interval)"
    )
    if not state:
        raise ConfigError(f"{run} holds no post-hoc EMA (its checkpoint has no power-function EMAs): {how}")
    t_r = int(state["step"])
    snapshots = [s for s in read_snapshots(run / SNAPSHOT_DIR) if s.step < t_r]
    profiles: list[tuple[int, float, dict[str, torch.Tensor] | Path]]
    profiles = [(s.step, s.sigma_rel, s.path) for s in snapshots]
    profiles += list(zip([t_r] * len(state["sigma_rels"]), state["sigma_rels"], state["averages"]))
    steps = sorted({t for t, _, _ in profiles})
    if len(steps) < 2:
        raise ConfigError(
            f"{run} has post-hoc EMA snapshots at {len(steps) - 1} step(s) before its last step {t_r}; the fit needs "
            f"at least one: train longer, or {how}"
        )
    low, high = reconstructable_range(state["sigma_rels"])
    if not low <= sigma_rel <= high:
        raise ConfigError(
            f"sigma_rel={sigma_rel} lies outside [{low:.4g}, {high:.4g}], the widths the snapshots of {run} "
            f"(sigma_rel {state['sigma_rels']}) reconstruct well"
        )
    gamma_r = sigma_rel_to_gamma(sigma_rel)
    x = solve_posthoc_coefficients(
        [t for t, _, _ in profiles], [sigma_rel_to_gamma(s) for _, s, _ in profiles], [t_r], [gamma_r]
    )[:, 0]
    weights = reconstruct(x, [p for _, _, p in profiles])
    state_dict = ckpt["state_dict"]
    for name, value in weights.items():
        key = f"ema.module.{name}"
        state_dict[key] = value.to(state_dict[key].dtype)
    ckpt["posthoc_ema"] = {
        "sigma_rel": sigma_rel, "gamma": gamma_r, "step": t_r,
        "profiles": [{"step": t, "sigma_rel": s, "coefficient": float(c)} for (t, s, _), c in zip(profiles, x)],
    }
    out = Path(cfg.out) if cfg.get("out") else run / "checkpoints" / f"posthoc_ema_{sigma_rel:g}.ckpt"
    atomic_write(out, lambda f: torch.save(ckpt, f), size_hint=checkpoint_nbytes(ckpt))
    print(f"post-hoc EMA sigma_rel={sigma_rel:g} (gamma {gamma_r:.3f}) at step {t_r}, from {len(profiles)} profiles "
          f"at {len(steps)} steps: {out}", flush=True)
    return out


def reconstruct(x: np.ndarray, profiles: list[dict[str, torch.Tensor] | Path]) -> dict[str, torch.Tensor]:
    """sum_i x_i theta_i in float64 over stored averages (a snapshot file or tensors by name); x (N,)."""
    from safetensors.torch import load_file

    total: dict[str, torch.Tensor] = {}
    for coefficient, profile in zip(x, profiles):
        tensors: dict[str, Any] = load_file(str(profile)) if isinstance(profile, Path) else profile
        for name, value in tensors.items():
            term = float(coefficient) * value.double()
            total[name] = total[name] + term if name in total else term
    return total


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="posthoc_ema")
def main(cfg: DictConfig) -> None:
    posthoc_ema(cfg)
