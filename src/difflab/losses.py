"""Training losses (pure torch)."""

from __future__ import annotations

from torch import Tensor


def simple_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """L_simple = E_{t, x0, eps} ||eps - eps_theta(x_t, t)||^2 (Ho et al. 2020, eq. 14).

    Averaged over every element, so its scale does not depend on the image size. Shapes (B, ...).
    """
    return (eps - eps_pred).square().mean()
