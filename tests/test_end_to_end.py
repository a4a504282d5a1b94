"""train.py and sample.py run as a user runs them: files, shapes, dtypes, resume (bad input: test_bad_inputs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.errors import ConfigError
from tests.conftest import TINY_TRAIN, compose, run_script

pytestmark = pytest.mark.slow


def test_train_writes_the_run_layout(trained_run):
    assert (trained_run / ".hydra" / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    assert ckpts == ["best.ckpt", "last.ckpt", "step_000003.ckpt", "step_000006.ckpt"]
    grid = Image.open(trained_run / "samples" / "step_000006.png")
    assert grid.size == (4 * (2 * 8 + 3 * 2) // 1, 4 * (2 * 8 + 3 * 2))  # 2x2 images of 8 px, 2 px padding, x4
    metrics = (trained_run / "logs" / "metrics.csv").read_text()
    assert all(k in metrics for k in ("train/loss", "train/lr", "train/ema_decay", "val/loss_ema"))
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    assert ckpt["state_dict"]["net.unet.conv_in.weight"].shape[1:] == (1, 3, 3)  # the UNet follows the data's channels
    ema_keys = [k for k in ckpt["state_dict"] if k.startswith("ema.module.")]
    assert ema_keys and ckpt["state_dict"]["ema._extra_state"] == {"num_updates": 6}


def test_sample_py_from_the_checkpoint(trained_run, tmp_path):
    out = tmp_path / "samples"
    proc = run_script(
        "sample.py", f"ckpt={trained_run}/checkpoints/last.ckpt", "num_samples=6", "batch_size=4", "seed=1",
        f"out_dir={out}", "progress=false", "sampler=ddpm", "sampler.num_steps=20",
    )
    assert "samples.npz (6, 8, 8, 1) uint8" in proc.stdout
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (6, 8, 8, 1) and arr.dtype == np.uint8
    assert arr.std() > 0
    assert Image.open(out / "grid.png").size == (4 * (3 * 8 + 4 * 2), 4 * (2 * 8 + 3 * 2))


def test_sample_task_uses_ema_and_the_run_dir(trained_run, tmp_path):
    from difflab.tasks import sample

    overrides = [f"ckpt={trained_run}", "num_samples=3", "sampler.num_steps=3", "progress=false"]
    ema = sample(compose("sample", [*overrides, f"output_dir={tmp_path / 'a'}"]))["images"]
    raw = sample(compose("sample", [*overrides, f"output_dir={tmp_path / 'b'}", "use_ema=false"]))["images"]
    again = sample(compose("sample", [*overrides, f"output_dir={tmp_path / 'c'}"]))["images"]
    assert np.array_equal(ema, again) and not np.array_equal(ema, raw)
    with pytest.raises(ConfigError, match="already exists: pick another out_dir, or set overwrite=true"):
        sample(compose("sample", [*overrides, f"output_dir={tmp_path / 'a'}"]))


def test_resume_continues_the_step_count(trained_run, tmp_path):
    run_dir = tmp_path / "resumed"
    run_script(
        "train.py", *TINY_TRAIN, "trainer.max_steps=9", f"ckpt_path={trained_run}/checkpoints/last.ckpt",
        f"hydra.run.dir={run_dir}",
    )
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 9
    assert ckpt["state_dict"]["ema._extra_state"] == {"num_updates": 9}  # EMA restored, then 3 more updates
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt", "step_000009.ckpt"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"garbage", "truncated, corrupted or not a torch checkpoint"), (None, "is not a difflab checkpoint")],
    ids=["corrupt", "foreign"],
)
def test_wrong_checkpoint_is_a_clear_error(tmp_path, content, message):
    from difflab.build import load_checkpoint

    path = tmp_path / "x.ckpt"
    if content is None:
        torch.save({"state_dict": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_checkpoint(path)


def test_help_lists_the_config_groups():
    proc = run_script("train.py", "--help")
    for group in ("dataset", "model", "schedule", "sampler", "trainer", "logger", "callbacks"):
        assert f"{group}:" in proc.stdout
    assert "image_folder" in proc.stdout and "cosine" in proc.stdout and "ddpm" in proc.stdout


def test_gpu_trainer_config_composes():
    cfg = compose("train", ["trainer=gpu", "output_dir=/unused"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.max_steps == compose("train", ["output_dir=/unused"]).trainer.max_steps


def test_multirun_sweep_gives_one_dir_per_job(tmp_path):
    proc = run_script("train.py", "-m", *TINY_TRAIN, "trainer.max_steps=3", "schedule=linear,cosine",
                      f"hydra.sweep.dir={tmp_path}")
    reported = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("val/loss_ema:")]
    assert len(reported) == 2 and all(0 < v < 2 for v in reported)  # each job reports its optimized_metric
    for job in ("0", "1"):
        ckpt = torch.load(tmp_path / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 3
    schedules = [torch.load(tmp_path / j / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
                 ["run_config"]["schedule"]["_target_"] for j in ("0", "1")]
    assert schedules == ["difflab.schedule.NoiseSchedule.linear", "difflab.schedule.NoiseSchedule.cosine"]
    assert not (tmp_path / "latest").exists()  # the latest link is for single runs only
