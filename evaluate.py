"""Evaluate a checkpoint: python evaluate.py ckpt=PATH [metrics=[fid,kid,nll]] [num_samples=N] (see README.md)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from difflab.tasks import evaluate, run_job  # imported here so --help and config errors answer at once

    run_job(evaluate, cfg)


if __name__ == "__main__":
    main()
