"""Lightning callbacks."""

from difflab.callbacks.checkpoint import PeriodicCheckpoint
from difflab.callbacks.divergence import DivergenceGuard
from difflab.callbacks.evaluation import Evaluation
from difflab.callbacks.posthoc_ema import PostHocEMA
from difflab.callbacks.preemption import Preemption
from difflab.callbacks.progress import RunProgress
from difflab.callbacks.reconstructions import Reconstructions
from difflab.callbacks.sample_grid import SampleGrid
from difflab.callbacks.save_vae import SaveVAE
from difflab.callbacks.seeding import SeedEachStep

__all__ = [
    "DivergenceGuard", "Evaluation", "PeriodicCheckpoint", "PostHocEMA", "Preemption", "Reconstructions", "RunProgress",
    "SampleGrid", "SaveVAE", "SeedEachStep",
]
