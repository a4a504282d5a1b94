"""Lightning callbacks."""

from difflab.callbacks.checkpoint import PeriodicCheckpoint
from difflab.callbacks.divergence import DivergenceGuard
from difflab.callbacks.evaluation import Evaluation
from difflab.callbacks.preemption import Preemption
from difflab.callbacks.sample_grid import SampleGrid
from difflab.callbacks.seeding import SeedEachStep

__all__ = ["DivergenceGuard", "Evaluation", "PeriodicCheckpoint", "Preemption", "SampleGrid", "SeedEachStep"]
