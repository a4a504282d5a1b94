"""Sample from a trained checkpoint: python sample.py ckpt=PATH [num_samples=N] [sampler=ddim|ddpm] (see README.md)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from difflab.tasks import sample
    from difflab.tasks.console import run_task  # imported here so --help and config errors answer at once

    run_task(sample, cfg)


if __name__ == "__main__":
    main()
