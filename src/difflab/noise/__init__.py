"""The noise of the diffusion process: iid or shaped (:mod:`~difflab.noise.shaped`: the base class, iid and offset;
:mod:`~difflab.noise.fitted`: fitted to the data's covariance), the data statistics they are fitted from
(:mod:`~difflab.noise.statistics`), and the options by name (:mod:`~difflab.noise.options`).

The noise classes are importable from here, the ``_target_`` paths of every config and checkpoint
(``difflab.noise.CovarianceNoise``, ...). Per-sample random generators live in :mod:`difflab.seeding`.
"""

from difflab.noise.fitted import CovarianceNoise, FittedNoise, LowRankNoise, SpectralNoise
from difflab.noise.options import NOISES, load_noise
from difflab.noise.shaped import IIDNoise, OffsetNoise, ShapedNoise
from difflab.noise.statistics import effective_rank, participation_ratio, shape_spectrum

__all__ = [
    "NOISES", "CovarianceNoise", "FittedNoise", "IIDNoise", "LowRankNoise", "OffsetNoise", "ShapedNoise", "SpectralNoise",
    "effective_rank", "load_noise", "participation_ratio", "shape_spectrum",
]
