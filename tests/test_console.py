"""A run that reports itself: one progress report over the run, one bar over all samples, a clean console, and
evaluate.py training the dataset's feature classifier once when none is given."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from difflab.build import build_module
from difflab.samplers import DDIM
from difflab.tasks import evaluate, train
from difflab.tasks.console import run_task
from tests.conftest import TINY_TRAIN, compose, run_script

PLAIN = re.compile(r"^step (\d+)/6 \(\d+%\)  loss [\d.e+-]+  \d+ img/s  elapsed \d:\d\d:\d\d  ETA \d:\d\d:\d\d$", re.M)


def _train(tmp_path, *overrides):
    cfg = compose("train", [*TINY_TRAIN, "trainer.enable_progress_bar=true", "callbacks.progress.every_n_steps=2",
                            f"output_dir={tmp_path / 'run'}", *overrides])
    return run_task(train, cfg)


def test_training_reports_the_whole_run_in_plain_lines_off_a_terminal(tmp_path, capsys, caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(tmp_path)
    out = capsys.readouterr().out
    assert [int(s) for s in PLAIN.findall(out)] == [2, 4, 6]  # every 2 steps of max_steps=6, over the whole run
    assert re.findall(r"^step (\d+): val/loss_ema [\d.]+$", out, re.M) == ["3", "6"]  # after each validation
    assert "Epoch" not in out and "\r" not in out
    assert "Tip:" not in caplog.text  # Lightning's advertisements are dropped
    ours = [w for w in caught if "deprecat" in str(w.message).lower()]
    assert not ours, [f"{w.filename}: {w.message}" for w in ours]


def test_training_on_a_terminal_draws_one_bar_over_the_steps(tmp_path, capsys):
    _train(tmp_path, "+callbacks.progress.tty=true")
    out = capsys.readouterr().out
    assert not PLAIN.search(out)
    frames = out.split("\r")
    assert any(re.search(r"training: 100%.*\| 6/6 \[.*img/s, loss", f) for f in frames), out[-500:]
    assert all("/6 [" in f for f in frames if f.startswith("training"))  # one bar, counted in steps of the run


def test_sampling_draws_one_bar_over_all_images(capsys):
    module = build_module(compose("train", ["model=tiny", "dataset.resolution=8", "output_dir=unused"]))
    images = module.generate(DDIM(num_steps=3), num_samples=10, batch_size=4, progress=True)
    err = capsys.readouterr().err
    assert images.shape == (10, 1, 8, 8)
    assert err.count("\n") == 1 and "10/10 images" in err  # one bar (closed once) for 3 batches
    shown = [int(n) for n in re.findall(r"\| (\d+)/10 images", err)]
    assert shown == sorted(shown) and shown[-1] == 10  # never backwards (tqdm redraws at most every 0.1 s)


@pytest.mark.slow
def test_a_config_error_ends_the_script_with_its_message_and_each_log_line_once():
    proc = run_script("train.py", "schedule.beta_end=1.5", "hydra.run.dir=/tmp/difflab-never-written", check=False)
    assert proc.returncode == 1
    assert "Error: schedule config is invalid" in proc.stderr and "beta_end=1.5" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "HYDRA_FULL_ERROR" not in proc.stderr
    assert (proc.stdout + proc.stderr).count("Seed set to 0") == 1  # Hydra's log line, not Lightning's handler too


def test_evaluate_trains_the_feature_classifier_once_per_dataset(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    args = [f"ckpt={trained_run}", "num_samples=8", "sampler.num_steps=2", "metrics=[fid]", "progress=false"]

    def config(name: str):
        cfg = compose("evaluate", [*args, f"output_dir={tmp_path / name}"])
        cfg.feature_classifier_overrides = [
            "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false", "classifier.net.block_out_channels=[16,32]",
        ]
        return cfg

    first = evaluate(config("e1"))
    out = capsys.readouterr().out
    cached = list((tmp_path / "cache" / "feature_classifier").iterdir())
    assert len(cached) == 1 and (cached[0] / "checkpoints" / "last.ckpt").is_file()
    assert f"training one once (train_classifier.py --config-name feature_classifier), cached in {cached[0]}" in out
    second = evaluate(config("e2"))
    out = capsys.readouterr().out
    assert "training one" not in out and f"feature classifier {cached[0]}" in out
    assert second["features"]["fingerprint"] == first["features"]["fingerprint"]  # the same cached weights
    assert torch.isfinite(torch.tensor(second["metrics"]["fid"]))
