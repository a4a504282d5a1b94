"""Export a trained checkpoint in diffusers' format: python export.py ckpt=PATH out=DIR (see README.md)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from difflab.tasks import export
    from difflab.tasks.console import run_task  # imported here so --help and config errors answer at once

    run_task(export, cfg)


if __name__ == "__main__":
    main()
