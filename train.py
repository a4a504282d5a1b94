"""Train a diffusion model: python train.py [GROUP=OPTION ...] [key=value ...] (see README.md)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from difflab.tasks import run_job, train  # imported here so --help and config errors answer at once

    return run_job(train, cfg)


if __name__ == "__main__":
    main()
