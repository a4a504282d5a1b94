"""Timestep grids for respaced sampling, as explicit (t, t_prev) pairs.

Every sampler walks the pairs this module makes; no step works out its predecessor for itself
(the bug class of diffusers issues #12633 and #11347).
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

Spacing = Literal["trailing", "leading", "linspace"]
SPACINGS: tuple[str, ...] = get_args(Spacing)


def timestep_grid(num_train_timesteps: int, num_steps: int, spacing: Spacing = "trailing") -> list[int]:
    """The ``num_steps`` timesteps a sampler visits, descending, as defined in Lin et al. 2023, table 2.

    ``trailing`` starts at T-1 and steps by T/num_steps; ``leading`` is (0, T//n, 2T//n, ...)
    reversed; ``linspace`` rounds an even grid over [0, T-1]. With num_steps = T all three are
    T-1, ..., 0.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    if int(num_steps) != num_steps or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"num_steps must be an integer in [1, {num_train_timesteps}] (the training timesteps), got {num_steps}"
        )
    T, n = num_train_timesteps, int(num_steps)
    if spacing == "trailing":
        grid = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    elif spacing == "leading":
        grid = (np.arange(n) * (T // n))[::-1]
    else:
        grid = np.linspace(0, T - 1, n).round().astype(np.int64)[::-1]
    return [int(t) for t in grid]


def step_pairs(grid: list[int]) -> list[tuple[int, int]]:
    """(t, t_prev) for each step of a descending grid; the last step goes to t_prev = -1 (abar = 1)."""
    if any(a <= b for a, b in zip(grid, grid[1:])):
        raise ValueError(f"a timestep grid must be strictly descending, got {grid}")
    return list(zip(grid, grid[1:] + [-1]))
