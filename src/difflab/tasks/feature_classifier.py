"""The FID / KID feature classifier of a dataset when none is given: trained once, cached by the dataset's fingerprint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from collections.abc import Callable
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from difflab.build import instantiate_node
from difflab.cache import cache_root
from difflab.distributed import tensor_digest
from difflab.metrics import dataset_description
from difflab.tasks.common import show

CONF = Path(__file__).resolve().parents[3] / "conf"
CLASSIFIER_FEATURES = "difflab.metrics.ClassifierFeatures.from_checkpoint"
"""The ``_target_`` of ``features=classifier``."""


def needs_cached_classifier(features: DictConfig | None) -> bool:
    """Whether ``features`` is ``features=classifier`` with no ``path``: the dataset's cached classifier is meant."""
    return features is not None and features.get("_target_") == CLASSIFIER_FEATURES and features.get("path") is None


def dataset_fingerprint(dataset: DictConfig | dict[str, Any], overrides: list[str]) -> str:
    """sha256 (16 hex digits) of the dataset's settings and images (all splits, as served) and the training overrides."""
    datamodule = instantiate_node(OmegaConf.create(dataset), "dataset")
    images, labels = datamodule.split("all")
    described = {"dataset": dataset_description(datamodule), "images": tensor_digest([images, labels]),
                 "overrides": list(overrides)}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def classifier_config(dataset: DictConfig | dict[str, Any], overrides: list[str], run_dir: Path) -> DictConfig:
    """conf/feature_classifier.yaml with ``overrides``, on ``dataset``, writing into ``run_dir`` without a logger."""
    args = [*overrides, "logger=none", "trainer.enable_model_summary=false"]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (evaluate.py): its config path holds conf/
        cfg = compose("feature_classifier", overrides=args)
    else:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("feature_classifier", overrides=args)
    return OmegaConf.merge(cfg, {"dataset": OmegaConf.create(dataset), "output_dir": str(run_dir)})


Fit = Callable[[DictConfig], Any]
"""difflab.tasks.train.train_classifier (passed in: that module imports this one)."""


def cached_feature_classifier(dataset: DictConfig | dict[str, Any], overrides: list[str], fit: Fit) -> Path:
    """The feature classifier run dir of ``dataset`` under ``<cache>/feature_classifier/<fingerprint>``; trained
    there first by ``fit`` (conf/feature_classifier.yaml with ``overrides``) if it holds no finished run."""
    run_dir = cache_root() / "feature_classifier" / dataset_fingerprint(dataset, overrides)
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        print(f"features:    no feature classifier is cached for this dataset: training one once "
              f"(train_classifier.py --config-name feature_classifier), cached in {show(run_dir)}", flush=True)
        fit(classifier_config(dataset, overrides, run_dir))
    print(f"features:    feature classifier {show(run_dir)} (cached by the dataset's fingerprint)", flush=True)
    return run_dir


def resolved_features(features: DictConfig, dataset: DictConfig | dict[str, Any], overrides: list[str], fit: Fit
                      ) -> DictConfig:
    """``features`` ready to build: with ``features=classifier`` and no ``path``, the path of ``dataset``'s cached
    classifier (trained on first use by ``fit`` with ``overrides`` of conf/feature_classifier.yaml)."""
    if not needs_cached_classifier(features):
        return features
    return OmegaConf.merge(features, {"path": str(cached_feature_classifier(dataset, overrides, fit))})
