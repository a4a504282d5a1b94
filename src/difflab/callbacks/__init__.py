"""Lightning callbacks."""

from difflab.callbacks.evaluation import Evaluation
from difflab.callbacks.preemption import Preemption
from difflab.callbacks.reconstructions import Reconstructions
from difflab.callbacks.sample_grid import SampleGrid
from difflab.callbacks.save_vae import SaveVAE

__all__ = ["Evaluation", "Preemption", "Reconstructions", "SampleGrid", "SaveVAE"]
