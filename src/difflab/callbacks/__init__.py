"""Lightning callbacks."""

from difflab.callbacks.sample_grid import SampleGrid

__all__ = ["SampleGrid"]
