"""DataModules: the bundled digits and a folder of images, with their error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import DigitsDataModule, ImageFolderDataModule
from difflab.errors import ConfigError


def test_digits_are_scaled_to_the_model_range_and_keep_labels():
    dm = DigitsDataModule(resolution=16, batch_size=64, val_fraction=0.1)
    dm.setup("fit")
    assert dm.train_set.images.shape == (1617, 1, 16, 16) and dm.val_set.images.shape == (180, 1, 16, 16)
    x = torch.cat([dm.train_set.images, dm.val_set.images])
    assert x.min().item() == pytest.approx(-1.0) and x.max().item() == pytest.approx(1.0, abs=0.02)
    labels = torch.cat([dm.train_set.labels, dm.val_set.labels])
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert dm.class_names == [str(d) for d in range(10)]
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (64, 1, 16, 16) and yb.shape == (64,) and yb.dtype == torch.long


def test_digits_at_native_resolution_are_the_sklearn_pixels():
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(resolution=8, val_fraction=0.0)
    dm.setup()
    raw = torch.as_tensor(load_digits().images, dtype=torch.float32)
    assert torch.allclose(torch.sort(dm.train_set.images.flatten())[0], torch.sort((raw / 8 - 1).flatten())[0])


def _write_images(folder, n, size=(20, 12), mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"img{i}.png")


def test_image_folder_with_class_subfolders(tmp_path):
    _write_images(tmp_path / "cats", 5)
    _write_images(tmp_path / "dogs", 3, mode="L")
    dm = ImageFolderDataModule(path=str(tmp_path), resolution=8, channels=3, batch_size=2, val_fraction=0.0, hflip=True)
    dm.setup()
    assert dm.class_names == ["cats", "dogs"]
    assert dm.train_set.images.shape == (8, 3, 8, 8)
    assert sorted(dm.train_set.labels.tolist()) == [0, 0, 0, 0, 0, 1, 1, 1]
    assert dm.train_set.images.min() >= -1 and dm.train_set.images.max() <= 1


def test_image_folder_centre_crops_to_a_square(tmp_path):
    img = np.zeros((10, 30), dtype=np.uint8)
    img[:, 10:20] = 255  # a white centre third: after the centre crop only white remains
    tmp_path.mkdir(exist_ok=True)
    Image.fromarray(img, "L").save(tmp_path / "wide.png")
    dm = ImageFolderDataModule(path=str(tmp_path), resolution=10, channels=1, batch_size=1, val_fraction=0.0)
    dm.setup()
    assert dm.train_set.images.shape == (1, 1, 10, 10)
    assert dm.train_set.labels.tolist() == [0] and dm.class_names == []
    assert torch.allclose(dm.train_set.images, torch.ones(1, 1, 10, 10))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, r"dataset.path=.*missing is not a directory"),
        (lambda p: (p / "missing").mkdir(), r"dataset.path=.*missing holds no images"),
        (lambda p: ((p / "missing").mkdir(), (p / "missing" / "bad.png").write_bytes(b"not a png")), r"bad.png is not an image PIL can open"),
    ],
    ids=["missing", "empty", "unreadable"],
)
def test_image_folder_errors_name_the_problem(tmp_path, setup, message):
    setup(tmp_path)
    dm = ImageFolderDataModule(path=str(tmp_path / "missing"), resolution=8, channels=3, batch_size=1)
    with pytest.raises(ConfigError, match=message):
        dm.setup()


def _captioned_folder(root, captions):
    """Gray 8x8 images a/0.png ... b/N.png whose pixel value is 10 * their index; ``captions``: index -> caption."""
    for i in range(len(captions)):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 10 * i, dtype=np.uint8), "L").save(root / "ab"[i % 2] / f"{i}.png")
    return {f"{'ab'[i % 2]}/{i}.png": c for i, c in captions.items()}


@pytest.mark.parametrize("in_memory", [True, False], ids=["in_memory", "lazy"])
def test_image_folder_captions_follow_their_images_through_both_paths(tmp_path, in_memory):
    import json

    rows = _captioned_folder(tmp_path, {i: f"image {i}" for i in range(10)})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": c}) + "\n"
                                                     for f, c in reversed(rows.items())))  # row order is free
    dm = ImageFolderDataModule(path=str(tmp_path), resolution=8, channels=1, batch_size=2, val_fraction=0.3,
                               in_memory=in_memory, captions=True)
    dm.setup()
    assert dm.decoded_in_memory is in_memory
    for part in (dm.train_set, dm.val_set):
        index = ((part.images[:, 0, 0, 0] + 1) * 127.5 / 10).round().long().tolist()  # each image's own index
        assert part.captions == [f"image {i}" for i in index]
        assert part.labels.tolist() == [i % 2 for i in index]  # class folders a, b
    x, _, captions = next(iter(dm.train_dataloader()))
    assert captions == [f"image {i}" for i in ((x[:, 0, 0, 0] + 1) * 127.5 / 10).round().long().tolist()]


def test_image_folder_captions_from_csv_another_column_and_allowed_missing_rows(tmp_path):
    rows = _captioned_folder(tmp_path, {i: f"image {i}" for i in range(6)})
    del rows["b/5.png"]
    rows_csv = "".join(f'{f},"{c}, in csv"\n' for f, c in rows.items())
    (tmp_path / "metadata.csv").write_text("file_name,prompt\n" + rows_csv)
    settings = dict(path=str(tmp_path), resolution=8, channels=1, batch_size=1, val_fraction=0.0, captions=True,
                    caption_column="prompt")
    missing = r"1 of the 6 images under dataset.path=.* have no caption in .*metadata.csv: b/5.png"
    with pytest.raises(ConfigError, match=missing):
        ImageFolderDataModule(**settings).setup()
    dm = ImageFolderDataModule(**settings, allow_missing_captions=True)
    with pytest.warns(UserWarning, match="val_fraction=0"):
        dm.setup()
    assert dm.captions == ["image 0, in csv", "image 2, in csv", "image 4, in csv", "image 1, in csv",
                           "image 3, in csv", ""]  # a/ then b/, sorted; b/5.png: the empty prompt


@pytest.mark.parametrize("dataset", ["digits", "image_folder"])
def test_runs_from_before_the_caption_keys_compare_equal_to_todays_config(dataset):
    """A run config whose dataset lacks the caption keys (written before them) upgrades to today's defaults: its run
    dir still resumes (resume compares the dataset settings)."""
    from omegaconf import OmegaConf

    from difflab.build import upgrade_run_config
    from tests.conftest import compose

    today = compose("train", [f"dataset={dataset}", "output_dir=unused"])
    old = OmegaConf.to_container(today)
    for key in ("captions", "caption_column", "allow_missing_captions"):
        old["dataset"].pop(key, None)
    assert old["dataset"] != OmegaConf.to_container(today.dataset)
    assert upgrade_run_config(OmegaConf.create(old)).dataset == today.dataset


def test_truncated_image_is_refused(tmp_path):
    _write_images(tmp_path, 2, size=(64, 64))
    data = (tmp_path / "img1.png").read_bytes()
    (tmp_path / "img1.png").write_bytes(data[: len(data) // 2])
    dm = ImageFolderDataModule(path=str(tmp_path), resolution=8, channels=3, batch_size=1, val_fraction=0.5)
    with pytest.raises(ConfigError, match=r"cannot read image .*img1.png"):
        dm.setup()  # in memory: decoded at setup
    lazy = ImageFolderDataModule(
        path=str(tmp_path), resolution=8, channels=3, batch_size=1, in_memory=False, val_fraction=0
    )
    with pytest.warns(UserWarning, match="val_fraction=0"):
        lazy.setup()  # its header is fine: the lazy path finds the truncated body when it decodes it
    with pytest.raises(ConfigError, match=r"cannot read image .*img1.png"):
        lazy.train_set.images


def test_batch_size_larger_than_the_training_split_is_refused():
    with pytest.raises(ConfigError, match="fewer than dataset.batch_size=5000"):
        DigitsDataModule(resolution=8, batch_size=5000).setup()


def _load_one(folder, **kwargs):
    dm = ImageFolderDataModule(path=str(folder), batch_size=1, val_fraction=0.5, **kwargs)
    dm.setup()
    return torch.cat([dm.train_set.images, dm.val_set.images])


@pytest.mark.parametrize(
    ("mode", "name", "dtype", "value"),
    [("I;16", "a.png", np.uint16, 1000), ("I;16B", "a.tif", ">u2", 1000), ("I", "a.tif", np.int32, 1000),
     ("F", "a.tif", np.float32, 1000 / 65535)],
    ids=["I;16", "I;16B", "I", "F"],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_high_bit_depth_images_are_scaled_by_their_bit_depth(tmp_path, mode, name, dtype, value, channels):
    Image.frombytes(mode, (6, 6), np.full((6, 6), value, dtype).tobytes()).save(tmp_path / name)
    Image.fromarray(np.full((6, 6), 200, np.uint8)).save(tmp_path / "b.png")  # 8-bit: as before, 200 / 127.5 - 1
    with Image.open(tmp_path / name) as img:
        assert img.mode == mode
    x = _load_one(tmp_path, resolution=4, channels=channels)
    assert x.shape == (2, channels, 4, 4)
    values = sorted(x.flatten().unique().tolist())  # 16-bit 1000 is dark: about -0.97, not clipped to white (1.0)
    assert values == [pytest.approx(2 * 1000 / 65535 - 1, abs=1e-6), pytest.approx(200 / 127.5 - 1, abs=1e-7)]


@pytest.mark.parametrize(
    ("mode", "value", "says"),
    [("F", 1.5, r"\[1.5, 1.5\], outside \[0, 1\]"), ("I", 70000, r"\[70000, 70000\], outside \[0, 65535\]")],
    ids=["F", "I"],
)
def test_high_bit_depth_values_off_their_scale_are_refused(tmp_path, mode, value, says):
    dtype = np.float32 if mode == "F" else np.int32
    Image.frombytes(mode, (4, 4), np.full((4, 4), value, dtype).tobytes()).save(tmp_path / "a.tif")
    with pytest.raises(ConfigError, match=rf"image .*a.tif \(mode {mode}\) has values in {says}.*rescale it"):
        _load_one(tmp_path, resolution=4, channels=1)


def test_exif_orientation_is_applied_before_resizing(tmp_path):
    upright = np.full((16, 16, 3), 30, np.uint8)
    upright[:, 8:] = 220  # dark left half, bright right half
    upright[:4] = 120  # a grey top band
    Image.fromarray(upright).save(tmp_path / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the stored image is shown turned 90 degrees clockwise
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.jpg", quality=95, exif=exif)
    from difflab.data.image_folder import load_image

    a, b = (load_image(tmp_path / f"{name}.jpg", 8, 3) for name in ("upright", "turned"))
    assert (a - b).abs().max().item() < 0.1  # equal within JPEG's error
    assert (a - b.transpose(1, 2)).abs().mean().item() > 0.5  # read as stored, it would be far off


def test_a_stray_image_beside_class_folders_is_refused_naming_a_few(tmp_path):
    _write_images(tmp_path / "cats", 2)
    _write_images(tmp_path / "stray", 7)
    for p in sorted((tmp_path / "stray").iterdir()):
        p.rename(tmp_path / p.name)
    (tmp_path / "stray").rmdir()
    dm = ImageFolderDataModule(path=str(tmp_path), resolution=8, channels=3, batch_size=1)
    with pytest.raises(ConfigError) as raised:
        dm.setup()
    assert f"dataset.path={tmp_path} holds class sub-folders (cats) and also 7 image(s) at its top level " \
           "(img0.png, img1.png, img2.png, img3.png, img4.png, ...)" in str(raised.value)


def test_a_flat_folder_beside_an_image_less_sub_folder_stays_one_set(tmp_path):
    _write_images(tmp_path, 4)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("no images here")
    assert _load_one(tmp_path, resolution=8, channels=3).shape == (4, 3, 8, 8)


def test_the_pixel_limit_is_pillows_by_default_and_can_be_raised(tmp_path):
    from omegaconf import OmegaConf

    assert OmegaConf.load("conf/dataset/image_folder.yaml").max_image_pixels == Image.MAX_IMAGE_PIXELS == 89478485
    assert ImageFolderDataModule(path=str(tmp_path)).max_image_pixels == Image.MAX_IMAGE_PIXELS
    _write_images(tmp_path, 2, size=(12, 10))  # 120 pixels
    with pytest.raises(ConfigError, match=r"img0.png has 12x10 = 120 pixels, more than dataset.max_image_pixels=119"):
        _load_one(tmp_path, resolution=8, channels=3, max_image_pixels=119)
    assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's own limit is restored
    assert _load_one(tmp_path, resolution=8, channels=3, max_image_pixels=120).shape == (2, 3, 8, 8)
    with pytest.raises(ConfigError, match="dataset.max_image_pixels must be a positive integer .* got 0"):
        ImageFolderDataModule(path=str(tmp_path), max_image_pixels=0)


@pytest.mark.parametrize("resolution", [0, -8, 8.5, "8", True])
def test_resolution_must_be_a_positive_integer(resolution):
    with pytest.raises(ConfigError, match=rf"dataset.resolution must be a positive integer .* got {resolution!r}"):
        DigitsDataModule(resolution=resolution)


def test_val_fraction_zero_warns_that_there_is_no_validation():
    dm = DigitsDataModule(resolution=8, val_fraction=0)
    with pytest.warns(UserWarning) as warned:
        dm.setup()
    assert [str(w.message) for w in warned] == [
        "dataset.val_fraction=0: no images are held out, so training runs no validation: no val/loss is logged and "
        "no checkpoints/best.ckpt is written (only last.ckpt and step_*.ckpt); set dataset.val_fraction > 0 to validate"
    ]
    assert len(dm.train_set) == 1797 and len(dm.val_set) == 0


@pytest.mark.parametrize(
    ("n", "fraction", "says"),
    [(6, 0.05, "dataset.val_fraction=0.05 of 6 images rounds to 0 validation images: use dataset.val_fraction "
               ">= 0.1667 (one image), or dataset.val_fraction=0"),
     (1, 0.3, "dataset.val_fraction=0.3 of 1 images rounds to 0 validation images: use dataset.val_fraction=0")],
    ids=["6 images", "1 image"],
)
def test_a_validation_split_of_no_image_is_refused_naming_the_fraction_needed(tmp_path, n, fraction, says):
    _write_images(tmp_path, n)
    with pytest.raises(ConfigError) as raised:
        ImageFolderDataModule(path=str(tmp_path), resolution=8, batch_size=1, val_fraction=fraction).setup()
    assert says in str(raised.value)
    if n > 1:  # the fraction named holds out one image
        dm = ImageFolderDataModule(path=str(tmp_path), resolution=8, batch_size=1, val_fraction=0.1667)
        dm.setup()
        assert (len(dm.train_set), len(dm.val_set)) == (n - 1, 1)


def test_skip_bad_leaves_out_bad_files_with_a_warning_that_counts_them(tmp_path):
    _write_images(tmp_path, 3)
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "tiny.png")  # smaller than the resolution
    dm = ImageFolderDataModule(path=str(tmp_path), resolution=8, channels=3, batch_size=1, val_fraction=0.34,
                               skip_bad=True)
    with pytest.warns(UserWarning, match=r"dataset.skip_bad=true: skipped 2 of 5 images: .*empty.png is empty"):
        dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 3
    (tmp_path / "empty.png").unlink()
    upscaled = ImageFolderDataModule(path=str(tmp_path), resolution=8, batch_size=1, val_fraction=0.25, upscale=True)
    upscaled.setup()
    assert len(upscaled.train_set) + len(upscaled.val_set) == 4


def test_the_png_header_read_agrees_with_pillow_and_leaves_other_files_to_it(tmp_path):
    from difflab.data.image_folder import header_problem, png_size

    Image.new("RGB", (37, 21)).save(tmp_path / "a.png")
    Image.new("RGB", (37, 21)).save(tmp_path / "b.jpg")
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8)  # a PNG signature and nothing after it
    assert png_size(tmp_path / "a.png") == Image.open(tmp_path / "a.png").size == (37, 21)
    for k, mode in enumerate(["1", "L", "LA", "P", "RGBA", "I;16"]):  # every PNG colour type and bit depth family
        Image.new(mode, (5 + k, 300 - k)).save(tmp_path / f"{k}.png")
        assert png_size(tmp_path / f"{k}.png") == Image.open(tmp_path / f"{k}.png").size == (5 + k, 300 - k)
    assert png_size(tmp_path / "b.jpg") is None and png_size(tmp_path / "c.png") is None
    assert header_problem(tmp_path / "b.jpg", 16, 10**6, False) is None
    assert "smaller than dataset.resolution=32" in header_problem(tmp_path / "a.png", 32, 10**6, False)
    assert "is not an image PIL can open" in header_problem(tmp_path / "c.png", 16, 10**6, False)
    assert "has 37x21 = 777 pixels, more than dataset.max_image_pixels=700" in header_problem(tmp_path / "a.png", 16, 700, False)
