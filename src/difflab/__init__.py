"""difflab: DDPM experiments with PyTorch Lightning + Hydra."""

__version__ = "0.1.0"
