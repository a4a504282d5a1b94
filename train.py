"""Train a diffusion model: python train.py [GROUP=OPTION ...] [key=value ...] (see README.md)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from difflab.tasks import train  # imported here so --help and config errors answer at once

    metrics = train(cfg)
    return metrics.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
