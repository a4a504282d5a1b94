"""The dataset sources beside the digits: CIFAR python-version files, local Hugging Face datasets, and the
lazy path's agreement with the in-memory one. Every test writes its own small synthetic files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from difflab.data import DigitsDataModule, ImageFolderDataModule
from difflab.data.cifar import CifarDataModule
from difflab.data.hf import HFDataModule
from difflab.data.synthetic import synthetic_pixels, write_cifar, write_folder
from difflab.errors import ConfigError


def test_lazy_path_serves_the_in_memory_batches_with_workers():
    """in_memory=false with 2 workers: the same images, labels, order and flips as the in-memory path."""
    kwargs = {"resolution": 8, "batch_size": 32, "val_fraction": 0.5, "hflip": True}
    memory, lazy = DigitsDataModule(**kwargs), DigitsDataModule(**kwargs, in_memory=False, num_workers=2)
    memory.setup(), lazy.setup()
    assert memory.decoded_in_memory and not lazy.decoded_in_memory and not hasattr(lazy.train_set, "tensor")
    for a, b in zip(memory.train_dataloader(), lazy.train_dataloader(), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert lazy.train_dataloader().persistent_workers and lazy.train_dataloader().num_workers == 2


def test_auto_decodes_small_sets_into_memory_and_large_ones_lazily(monkeypatch):
    import difflab.data.base as base

    small = DigitsDataModule(resolution=8)
    small.setup()
    assert small.decoded_in_memory  # 1,797 x 64 floats: far below the threshold
    monkeypatch.setattr(base, "IN_MEMORY_MAX_BYTES", 1797 * 64 * 4 - 1)
    large = DigitsDataModule(resolution=8)
    large.setup()
    assert not large.decoded_in_memory


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_python_files_give_pixels_labels_and_class_names(tmp_path, variant):
    classes = 10 if variant == "cifar10" else 100
    write_cifar(tmp_path, 200, variant, classes)
    dm = CifarDataModule(path=str(tmp_path), variant=variant, batch_size=8, val_fraction=0, in_memory=False)
    with pytest.warns(UserWarning, match="val_fraction=0"):
        dm.setup()
    pixels, labels = synthetic_pixels(200, 32, classes, 0)  # the train split of write_cifar: seed 0
    order = torch.tensor(dm.train_set.positions).argsort()
    x = dm.train_set.images[order]
    assert torch.equal(x, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1)  # R, G, B planes
    assert dm.train_set.labels[order].tolist() == labels.tolist()
    assert len(dm.class_names) == classes and dm.class_names[:2] == ["red", "orange"]
    test = CifarDataModule(path=str(tmp_path / f"{'cifar-10-batches-py' if classes == 10 else 'cifar-100-python'}"),
                           variant=variant, split="all", batch_size=8)
    test.setup()
    assert len(test.train_set) + len(test.val_set) == 400


def test_a_partial_cifar_folder_names_the_missing_files_and_the_archive(tmp_path):
    folder = write_cifar(tmp_path, 50, "cifar10", 10)
    (folder / "data_batch_3").unlink()
    with pytest.raises(ConfigError) as raised:
        CifarDataModule(path=str(tmp_path), batch_size=8).setup()
    assert "missing data_batch_3." in str(raised.value)
    assert "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html)" in str(raised.value)


def test_a_cifar_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    folder = write_cifar(tmp_path, 50, "cifar10", 10)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": Payload()}, protocol=2))
    with pytest.raises(ConfigError, match=r"batches.meta is not a CIFAR .* names io.open"):
        CifarDataModule(path=str(tmp_path), batch_size=8).setup()
    assert not marker.exists()


@pytest.mark.parametrize("form", ["imagefolder", "save_to_disk", "parquet"])
def test_local_hf_dataset_gives_images_labels_and_captions(tmp_path, form):
    import datasets

    write_folder(tmp_path / "imagefolder", 60, 12, classes=3, captions=True)
    if form != "imagefolder":
        ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "imagefolder"), split="train")
        ds.save_to_disk(str(tmp_path / form)) if form == "save_to_disk" else ds.to_parquet(str(tmp_path / form / "a.parquet"))
    dm = HFDataModule(path=str(tmp_path / form), label_column="label", caption_column="text", resolution=8,
                      batch_size=6, val_fraction=0.1, in_memory=False, num_workers=1)
    dm.setup()
    assert len(dm.train_set) == 54 and dm.class_names == ["0", "1", "2"] and len(dm.captions) == 60
    x, y, captions = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    names = ["red", "orange", "yellow"]
    assert [c.split()[1] for c in captions] == [names[k] for k in y.tolist()]  # each caption belongs to its image
    with pytest.raises(ConfigError, match=r"dataset.caption_column='txt' is not a column .*: it has image, label, text"):
        HFDataModule(path=str(tmp_path / form), caption_column="txt").setup()


def test_mixed_modes_are_converted_to_the_channels_asked_for(tmp_path):
    from PIL import Image

    rgb = np.full((8, 8, 3), (200, 100, 50), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((8, 8), 7, np.uint8)])).save(tmp_path / "rgba.png")  # alpha dropped
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    Image.fromarray(np.full((8, 8), 120, np.uint8)).save(tmp_path / "gray.png")
    dm = ImageFolderDataModule(path=str(tmp_path), resolution=8, batch_size=1, val_fraction=0.25)
    dm.setup()
    x = ((dm.split("all")[0] + 1) * 127.5).round()
    assert x.shape == (4, 3, 8, 8)
    colours = sorted(tuple(v[:, 0, 0].tolist()) for v in x)
    assert colours == [(120, 120, 120), (200, 100, 50), (200, 100, 50), (200, 100, 50)]
