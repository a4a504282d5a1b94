"""A v-prediction run trained by train.py samples with every sampler; sample.py sweeps over the zoo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from difflab.build import load_checkpoint
from tests.conftest import CONF, TINY_TRAIN, compose, run_script

pytestmark = pytest.mark.slow

SAMPLERS = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))


@pytest.fixture(scope="module")
def v_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("v") / "run"
    run_script("train.py", *TINY_TRAIN, "objective=v", "schedule=cosine", f"hydra.run.dir={run_dir}")
    return run_dir


def test_a_v_model_samples_with_every_sampler(v_run):
    """Every sampler config on the trained v-model: finite samples; and the probability-flow ODE solvers,
    started from the same noise, land on the same images (a solver reading v as eps would not)."""
    module = load_checkpoint(v_run)
    assert module.objective == "v" and module.net.unet.config.out_channels == 1
    ode = {}
    for name in SAMPLERS:
        sampler = instantiate(compose("sample", [f"sampler={name}", "ckpt=x", "sampler.num_steps=10"]).sampler)
        images = module.generate(sampler, 4, seed=0)
        assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all(), name
        if name in ("ddim", "dpmpp_2m", "unipc", "kdpm2", "lms", "deis"):
            sampler.num_steps = 100 if name == "ddim" else 50
            ode[name] = module.generate(sampler, 4, seed=0)
    reference = ode.pop("ddim")
    scale = reference.abs().max()
    for name, images in ode.items():
        assert (images - reference).abs().max() <= 0.02 * scale, name


def test_sample_py_sweeps_samplers_and_steps(v_run, tmp_path):
    sweep = tmp_path / "sweep"
    run_script("sample.py", "-m", f"ckpt={v_run}", "sampler=ddim,dpmpp_2m,unipc", "sampler.num_steps=10,20",
               "num_samples=4", "progress=false", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 6
    for job in jobs:
        assert np.load(job / "samples.npz")["arr_0"].shape == (4, 8, 8, 1)
