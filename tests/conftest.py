"""Shared test fixtures. Tests run offline: no hub, no W&B network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# OpenMP threads sleep instead of spinning between parallel regions: on a 2-core machine shared with other
# processes (the script subprocesses the tests start), spinning made small torch ops 10-100x slower (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Overrides that keep a real train.py run to a few seconds.
TINY_TRAIN = [
    "model=tiny",
    "lr_scheduler=constant",  # a fixed rate over the few steps of a test (cosine has its own tests)
    "lr_scheduler.warmup_steps=0",
    "dataset.resolution=8",
    "dataset.batch_size=32",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "callbacks.sample_grid.every_n_steps=3",
    "callbacks.sample_grid.num_samples=4",
    "sampler.num_steps=5",
]


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` are skipped on machines without CUDA."""
    import torch

    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def run_script(script: str, *overrides: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """Run train.py / sample.py as a user would, from the repo root; returns the finished process."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def compose(config_name: str, overrides: list[str], return_hydra_config: bool = False):
    """The config ``config_name`` composes to, as Hydra would for the entry point."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=return_hydra_config)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny model trained for 6 steps by train.py; returns its run dir."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    run_script("train.py", *TINY_TRAIN, f"hydra.run.dir={run_dir}")
    return run_dir


TEXT_TRAIN = [*TINY_TRAIN, "conditioning=text", "logger=none"]
"""A tiny text model (scratch encoder) on the digits' captions."""


@pytest.fixture(scope="session")
def text_run(tmp_path_factory) -> Path:
    """A tiny text model trained 6 steps by train.py's task (tests/test_text.py; the text rows of test_bad_inputs)."""
    from difflab.tasks import train

    run = tmp_path_factory.mktemp("text") / "run"
    train(compose("train", [*TEXT_TRAIN, f"output_dir={run}"]))
    return run


FEATURE_CLASSIFIER = [
    "dataset.resolution=8", "dataset.batch_size=32", "trainer.max_steps=20", "trainer.val_check_interval=20",
    "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "classifier.net.block_out_channels=[16,32]", "logger=none",
]


@pytest.fixture(scope="session")
def feature_run(tmp_path_factory) -> Path:
    """A tiny clean-image classifier trained for 20 steps by the train_classifier task (feature_classifier config)."""
    from difflab.tasks import train_classifier

    run_dir = tmp_path_factory.mktemp("features") / "run"
    train_classifier(compose("feature_classifier", [*FEATURE_CLASSIFIER, f"output_dir={run_dir}"]))
    return run_dir


@pytest.fixture(scope="session")
def features(feature_run):
    """The FID / KID features of that classifier (8 x 8 digits, 32-d)."""
    from difflab.metrics import ClassifierFeatures

    return ClassifierFeatures.from_checkpoint(feature_run)


# A stage-1 run of the tiny VAE (f = 2, 2 latent channels) in seconds, with EMA so the export path is exercised.
TINY_VAE = [
    "autoencoder=tiny",
    "autoencoder.ema_decay=0.9",
    "trainer.max_steps=60",
    "trainer.val_check_interval=60",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.model_checkpoint.every_n_train_steps=30",
    "callbacks.reconstructions.every_n_steps=30",
    "callbacks.reconstructions.num_images=8",
]


@pytest.fixture(scope="session")
def stage1(tmp_path_factory):
    """A tiny stage-1 run in-process (tests/test_vae.py, and its VAE for test_latent.py): (run dir, returned metrics,
    held-out MSE of the same initial weights, as VAEModule logs val/rec_mse)."""
    import lightning as L
    import torch

    from difflab.data import DigitsDataModule
    from difflab.build import build_autoencoder
    from difflab.tasks import train_vae

    run_dir = tmp_path_factory.mktemp("vae") / "run"
    cfg = compose("vae", [*TINY_VAE, f"output_dir={run_dir}"])
    L.seed_everything(cfg.seed)
    held_out = DigitsDataModule().split("val")[0]
    vae = build_autoencoder(cfg).vae.eval()  # train_vae seeds and builds the same init
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(vae.decode(vae.encode(held_out).latent_dist.mean).sample, held_out).item()
    metrics = train_vae(cfg)
    return run_dir, metrics, before
