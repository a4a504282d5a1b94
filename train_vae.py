"""Stage 1 of latent diffusion, the autoencoder: python train_vae.py [key=value ...] (see README.md)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="vae")
def main(cfg: DictConfig) -> float | None:
    from difflab.tasks import run_job, train_vae  # imported here so --help and config errors answer at once

    return run_job(train_vae, cfg)


if __name__ == "__main__":
    main()
