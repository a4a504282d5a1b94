"""Train a noise-aware classifier for classifier guidance: python train_classifier.py [key=value ...] (see README.md)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="classifier")
def main(cfg: DictConfig) -> float | None:
    from difflab.tasks import run_job, train_classifier  # imported here so --help and config errors answer at once

    return run_job(train_classifier, cfg)


if __name__ == "__main__":
    main()
