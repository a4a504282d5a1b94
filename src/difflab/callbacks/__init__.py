"""Lightning callbacks."""

from difflab.callbacks.preemption import Preemption
from difflab.callbacks.reconstructions import Reconstructions
from difflab.callbacks.sample_grid import SampleGrid
from difflab.callbacks.save_vae import SaveVAE

__all__ = ["Preemption", "Reconstructions", "SampleGrid", "SaveVAE"]
