"""Post-hoc EMA (EDM2): the sigma_rel <-> gamma map, the least-squares reconstruction on a toy trajectory, and
the training callback + ``python -m difflab.posthoc_ema`` end to end, also across a preemption."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab.build import load_checkpoint
from difflab.callbacks.posthoc_ema import read_snapshots
from difflab.ema import PowerFunctionEMA, gamma_to_sigma_rel, sigma_rel_to_gamma, solve_posthoc_coefficients
from difflab.errors import ConfigError
from difflab.samplers import DDIM
from difflab.tasks import train
from difflab.tasks.posthoc_ema import posthoc_ema
from tests.conftest import TINY_TRAIN, compose
from tests.test_resume import assert_identical

STEPS, EVERY = 8, 2
WITH_SNAPSHOTS = [
    *TINY_TRAIN, f"trainer.max_steps={STEPS}", "trainer.val_check_interval=4",
    "callbacks.model_checkpoint.every_n_train_steps=4", "callbacks.sample_grid.every_n_steps=1000",
    f"callbacks.posthoc_ema.every_n_steps={EVERY}",
]


def test_sigma_rel_and_gamma_match_the_paper():
    """EDM2 Sec. 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94; the map inverts."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for sigma_rel in (0.02, 0.05, 0.08, 0.2):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    with pytest.raises(ValueError, match="sigma_rel must lie in"):
        sigma_rel_to_gamma(0.3)


@pytest.mark.parametrize("target", [0.07, 0.12])
def test_reconstruction_matches_the_ema_trained_at_that_width(target):
    """A random walk of 2000 steps (1000 coordinates); power EMAs at 0.05 and 0.10 stored every 50 steps.

    The fit's error, relative to how far the direct EMA lies from the current weights, measured 3.1e-5 (0.07)
    and 1.7e-5 (0.12) with float32 averages; the tracked 0.05 EMA itself is 0.24 / 0.54 off by that measure.
    """
    generator = torch.Generator().manual_seed(0)
    theta = torch.zeros(1000, dtype=torch.float64)
    tracked = PowerFunctionEMA([theta], [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)])
    direct = PowerFunctionEMA([theta], [sigma_rel_to_gamma(target)])
    snapshots: list[tuple[int, float, torch.Tensor]] = []
    for t in range(1, 2001):
        theta = theta + torch.randn(1000, generator=generator, dtype=torch.float64)
        tracked.update([theta], t)
        direct.update([theta], t)
        if t % 50 == 0:
            snapshots += [(t, g, average[0].clone()) for g, average in zip(tracked.gammas, tracked.averages)]
    x = solve_posthoc_coefficients([t for t, _, _ in snapshots], [g for _, g, _ in snapshots], [2000],
                                   [sigma_rel_to_gamma(target)])
    assert x.shape == (len(snapshots), 1) and x.sum() == pytest.approx(1.0, abs=1e-4)  # ~1: profiles integrate to 1
    reconstructed = sum(float(c) * s.double() for c, (_, _, s) in zip(x[:, 0], snapshots))
    expected = direct.averages[0][0].double()
    error = (reconstructed - expected).norm() / (expected - theta).norm()
    assert error < 3e-4


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory) -> Path:
    """The tiny model trained 8 steps with power-EMA snapshots every 2 steps."""
    run_dir = tmp_path_factory.mktemp("posthoc") / "run"
    train(compose("train", [*WITH_SNAPSHOTS, f"output_dir={run_dir}"]))
    return run_dir


def _cli(run: Path, sigma_rel: float, out: Path | None = None) -> Path:
    return posthoc_ema(compose("posthoc_ema", [f"run={run}", f"sigma_rel={sigma_rel}", f"out={out or 'null'}"]))


def test_reconstructed_checkpoint_samples_like_any_other(snapshot_run):
    snapshots = read_snapshots(snapshot_run / "posthoc_ema")
    assert [(s.step, s.sigma_rel) for s in snapshots] == [(t, s) for t in (2, 4, 6, 8) for s in (0.05, 0.1)]
    out = _cli(snapshot_run, 0.08)
    assert out == snapshot_run / "checkpoints" / "posthoc_ema_0.08.ckpt"
    last = torch.load(snapshot_run / "checkpoints" / "last.ckpt", weights_only=True)
    written = torch.load(out, weights_only=True)
    assert written["posthoc_ema"]["sigma_rel"] == 0.08 and written["posthoc_ema"]["step"] == STEPS
    key = next(k for k in last["state_dict"] if k.startswith("ema.module.") and k.endswith(".weight"))
    assert (written["state_dict"][key] - last["state_dict"][key]).abs().max() > 1e-4  # not the stored EMA
    module = load_checkpoint(out)
    images = module.generate(DDIM(num_steps=3), 2, seed=0)
    assert images.shape == (2, *module.image_shape) and torch.isfinite(images).all()
    # at a tracked width the fit picks that EMA: the reconstruction is the stored power EMA of the last step
    written = torch.load(_cli(snapshot_run, 0.1), weights_only=True)
    tracked = dict(zip((0.05, 0.1), last["callbacks"]["PostHocEMA"]["averages"]))[0.1]
    for name, value in tracked.items():
        torch.testing.assert_close(written["state_dict"][f"ema.module.{name}"], value, rtol=0, atol=1e-5)
    assert tracked.keys() == load_file(snapshots[-1].path).keys()


def test_bad_input_is_refused(snapshot_run, tmp_path):
    with pytest.raises(ConfigError, match=r"sigma_rel=0.5 lies outside \[0.025, 0.2\]"):
        _cli(snapshot_run, 0.5)
    run = tmp_path / "run"
    shutil.copytree(snapshot_run / "checkpoints", run / "checkpoints")
    with pytest.raises(ConfigError, match="snapshots at 0 step.*every_n_steps"):  # no snapshot files before step 8
        _cli(run, 0.08)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    del last["callbacks"]["PostHocEMA"]
    torch.save(last, run / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="holds no post-hoc EMA.*callbacks.posthoc_ema"):
        _cli(run, 0.08)


def test_preempted_and_resumed_run_writes_the_same_snapshots(snapshot_run, tmp_path, capsys):
    """SIGUSR2 at step 5 (between snapshots): save + stop; resuming continues the power EMAs bit for bit."""
    preempted = [*WITH_SNAPSHOTS, f"output_dir={tmp_path}"]
    train(compose("train", [*preempted, "+callbacks.signal._target_=tests.test_resume.SignalAt",
                            "+callbacks.signal.step=5"]))
    assert "preempted by SIGUSR2 at step 5" in capsys.readouterr().out
    train(compose("train", preempted))
    full, resumed = read_snapshots(snapshot_run / "posthoc_ema"), read_snapshots(tmp_path / "posthoc_ema")
    assert [(s.step, s.gamma) for s in full] == [(s.step, s.gamma) for s in resumed]
    for a, b in zip(full, resumed):  # (the files' bytes vary: safetensors orders the metadata by a hash map)
        expected, actual = load_file(a.path), load_file(b.path)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected), a.path.name
    states = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["PostHocEMA"]
              for run in (snapshot_run, tmp_path)]
    assert_identical(*states)
