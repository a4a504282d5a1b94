"""The noise of the diffusion process: iid or shaped (:mod:`difflab.noise.shaped`), and the data statistics it is
fitted from (:mod:`difflab.noise.statistics`).

The shaped-noise classes are importable from here, the ``_target_`` paths of every config and checkpoint
(``difflab.noise.CovarianceNoise``, ...). Per-sample random generators live in :mod:`difflab.seeding`.
"""

from difflab.noise.shaped import (
    NOISES,
    CovarianceNoise,
    FittedNoise,
    IIDNoise,
    LowRankNoise,
    OffsetNoise,
    ShapedNoise,
    SpectralNoise,
    load_noise,
)
from difflab.noise.statistics import effective_rank, participation_ratio, shape_spectrum

__all__ = [
    "NOISES", "CovarianceNoise", "FittedNoise", "IIDNoise", "LowRankNoise", "OffsetNoise", "ShapedNoise", "SpectralNoise",
    "effective_rank", "load_noise", "participation_ratio", "shape_spectrum",
]
