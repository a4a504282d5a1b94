"""Class-conditional training, CFG sampling and classifier guidance through the entry points."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.errors import ConfigError
from tests.conftest import TINY_TRAIN, compose, run_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cond") / "run"
    run_script("train.py", *TINY_TRAIN, "conditioning=class", f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clf") / "run"
    run_script(
        "train_classifier.py", "dataset.resolution=8", "dataset.batch_size=32", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
        "classifier.net.block_out_channels=[16,32]", f"hydra.run.dir={run_dir}",
    )
    return run_dir


def test_conditional_run_saves_classes_and_a_class_per_row_grid(conditional_run):
    ckpt = torch.load(conditional_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cond = ckpt["hyper_parameters"]["run_config"]["conditioning"]
    assert cond["num_classes"] == 10 and cond["class_names"] == [str(d) for d in range(10)] and cond["p_uncond"] == 0.1
    assert ckpt["state_dict"]["net.unet.class_embedding.weight"].shape[0] == 11  # 10 classes + the null label
    # 4 requested samples -> 1 per class, one class per row: a 10 x 1 grid of 8 px images, 2 px padding, x4
    assert Image.open(conditional_run / "samples" / "step_000006.png").size == (4 * (8 + 4), 4 * (10 * 8 + 11 * 2))


def test_sample_labels_all_with_guidance(conditional_run, tmp_path):
    out = tmp_path / "s"
    proc = run_script(
        "sample.py", f"ckpt={conditional_run}", "labels=all", "guidance_scale=3", "num_samples=20", "sampler.num_steps=4",
        "progress=false", f"out_dir={out}",
    )
    assert "classes:     {0: '0', 1: '1'" in proc.stdout
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape == (20, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [c for c in range(10) for _ in range(2)]
    assert Image.open(out / "grid.png").size == (4 * (2 * 8 + 3 * 2), 4 * (10 * 8 + 11 * 2))


def test_sample_labels_by_id_and_name(conditional_run, tmp_path):
    from difflab.tasks import sample

    base = [f"ckpt={conditional_run}", "num_samples=5", "sampler.num_steps=3", "progress=false"]
    out = sample(compose("sample", [*base, "labels=[7,'3']", f"output_dir={tmp_path / 'a'}"]))
    assert out["labels"].tolist() == [7, 3, 7, 3, 7]
    with pytest.raises(ConfigError, match=r"label 10 is not a class of this model: allowed are class ids in \[0, 10\)"):
        sample(compose("sample", [*base, "labels=[10]", f"output_dir={tmp_path / 'b'}"]))


def test_guidance_and_labels_on_an_unconditional_model_are_refused(trained_run, tmp_path):
    from difflab.tasks import sample

    base = [f"ckpt={trained_run}", "num_samples=2", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="labels=all given, but the model .* is unconditional"):
        sample(compose("sample", [*base, "labels=all"]))
    with pytest.raises(ConfigError, match="guidance_scale=3 needs a model trained with label dropout"):
        sample(compose("sample", [*base, "guidance_scale=3"]))


def test_guidance_on_a_model_without_label_dropout_is_refused(tmp_path):
    from difflab.tasks import sample, train

    run = tmp_path / "nodrop"
    train(compose("train", [*TINY_TRAIN, "trainer.max_steps=1", "conditioning=class", "conditioning.p_uncond=0", f"output_dir={run}"]))
    with pytest.raises(ConfigError, match=r"guidance_scale=2 needs .* num_classes=10, p_uncond=0: use guidance_scale=1"):
        sample(compose("sample", [f"ckpt={run}", "guidance_scale=2", f"output_dir={tmp_path / 's'}"]))


def test_classifier_guidance_end_to_end(trained_run, classifier_run, tmp_path):
    out = tmp_path / "cg"
    run_script(
        "sample.py", f"ckpt={trained_run}", f"classifier={classifier_run}", "classifier_scale=2", "labels=[1,2]",
        "num_samples=4", "sampler=ddim", "sampler.num_steps=4", "progress=false", f"out_dir={out}",
    )
    data = np.load(out / "samples.npz")
    assert data["arr_1"].tolist() == [1, 2, 1, 2] and data["arr_0"].shape == (4, 8, 8, 1)


def test_classifier_on_another_schedule_is_refused(classifier_run, tmp_path):
    from difflab.tasks import sample, train

    run = tmp_path / "cosine"
    train(compose("train", [*TINY_TRAIN, "trainer.max_steps=1", "schedule=cosine", f"output_dir={run}"]))
    with pytest.raises(ConfigError, match="was trained on another noise schedule"):
        sample(compose("sample", [f"ckpt={run}", f"classifier={classifier_run}", "classifier_scale=1", f"output_dir={tmp_path / 's'}"]))


def test_conditioning_needs_a_dataset_with_classes(tmp_path):
    from difflab.tasks import train

    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = compose("train", [*TINY_TRAIN, "conditioning=class", "dataset=image_folder", f"dataset.path={folder}",
                            "dataset.resolution=8", "dataset.batch_size=2", "dataset.val_fraction=0", f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(ConfigError, match="conditioning=class needs a dataset with classes"):
        train(cfg)


def test_image_folder_classes_train_and_sample_by_name(tmp_path, capsys):
    from difflab.tasks import sample, train

    rng = np.random.default_rng(0)
    for k, name in enumerate(["cats", "dogs"]):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 128 + 127 * k, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    run = tmp_path / "run"
    train(compose("train", [
        *TINY_TRAIN, "trainer.max_steps=2", "conditioning=class", "dataset=image_folder", f"dataset.path={tmp_path / 'data'}",
        "dataset.resolution=8", "dataset.batch_size=4", "dataset.val_fraction=0.2", "logger=none", f"output_dir={run}",
    ]))
    out = sample(compose("sample", [f"ckpt={run}", "labels=[dogs]", "num_samples=3", "sampler.num_steps=2",
                                    "progress=false", f"output_dir={tmp_path / 's'}"]))
    assert "classes:     {0: 'cats', 1: 'dogs'}" in capsys.readouterr().out
    assert out["labels"].tolist() == [1, 1, 1] and out["images"].shape == (3, 8, 8, 3)
    assert np.load(tmp_path / "s" / "samples.npz")["arr_1"].tolist() == [1, 1, 1]
