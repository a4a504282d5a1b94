"""Every noise option by name, and a noise rebuilt from its saved statistics file alone."""

from __future__ import annotations

from pathlib import Path

from difflab.errors import ConfigError
from difflab.noise.fitted import CovarianceNoise, LowRankNoise, SpectralNoise
from difflab.noise.shaped import IIDNoise, OffsetNoise, ShapedNoise, read_metadata

NOISES: dict[str, type[ShapedNoise]] = {
    cls.name: cls for cls in (IIDNoise, OffsetNoise, CovarianceNoise, LowRankNoise, SpectralNoise)
}
"""Every noise model by its option name in the ``noise`` config group."""


def load_noise(path: str | Path) -> ShapedNoise:
    """Rebuild the noise saved by :meth:`ShapedNoise.save` from the file alone."""
    name, config = read_metadata(path)
    if name not in NOISES:
        raise ConfigError(f"{path} holds unknown noise={name}; known: {', '.join(NOISES)}")
    return NOISES[name](**config).load(path)
