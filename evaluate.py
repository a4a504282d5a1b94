"""Evaluate a checkpoint: python evaluate.py ckpt=PATH [metrics=[fid,kid,nll]] [num_samples=N] (see README.md);
or score a training run's checkpoints as they are written: python evaluate.py watch=RUN_DIR (docs/evaluation.md)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from difflab.tasks import evaluate, run_job  # imported here so --help and config errors answer at once
    from difflab.tasks.watch import watch

    run_job(watch if cfg.get("watch") is not None else evaluate, cfg)


if __name__ == "__main__":
    main()
