"""difflab: DDPM experiments with PyTorch Lightning + Hydra."""

import os

# OpenMP threads sleep instead of spinning between parallel regions unless the user chose a policy (read when torch
# loads, so set before it is imported): spinning threads starve DataLoader workers; measured on 2 cores, a 6-step
# train.py run with one worker took 33 s spinning and 13 s passive (docs/data.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
