"""Lightning callbacks."""

from difflab.callbacks.evaluation import Evaluation
from difflab.callbacks.preemption import Preemption
from difflab.callbacks.sample_grid import SampleGrid

__all__ = ["Evaluation", "Preemption", "SampleGrid"]
