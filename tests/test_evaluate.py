"""evaluate.py: FID / KID / bits per dim of a checkpoint into results.json, early refusals, a sweep's summary."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from difflab.classifier import NoisyClassifier
from difflab.data import DigitsDataModule
from difflab.errors import ConfigError
from difflab.likelihood import bits_per_dim
from difflab.metrics import ClassifierFeatures
from difflab.summarize import main as summarize_main
from tests.conftest import compose, run_script


def _overrides(trained_run: Path, feature_run: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"ckpt={trained_run}", f"features.path={feature_run}", "num_samples=16", "sampler.num_steps=5", "kid_subsets=5",
        "nll.timesteps=5", "nll.num_images=16", f"cache_dir={tmp_path / 'reference'}", *extra,
    ]


def _evaluate(overrides: list[str], out: Path) -> dict:
    from difflab.tasks import evaluate

    return evaluate(compose("evaluate", [*overrides, f"output_dir={out}"]))


def test_evaluate_writes_fid_kid_and_bits_per_dim(trained_run, feature_run, features, tmp_path, capsys):
    from difflab.build import load_checkpoint

    results = _evaluate(_overrides(trained_run, feature_run, tmp_path), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    printed = capsys.readouterr().out
    assert "FID:" in printed and "KID:" in printed and "bits/dim:" in printed
    m = results["metrics"]
    assert set(m) == {"fid", "kid_mean", "kid_std", "kid_subset_size", "nll_bpd", "nll_bpd_stderr", "nll_prior_bpd",
                      "nll_kl_bpd", "nll_decoder_bpd"}
    assert all(math.isfinite(v) for v in m.values()) and m["fid"] > 0 and m["nll_bpd"] > 0
    assert m["nll_bpd"] == pytest.approx(m["nll_prior_bpd"] + m["nll_kl_bpd"] + m["nll_decoder_bpd"], rel=1e-6)
    assert results["ckpt"] == str(trained_run / "checkpoints" / "last.ckpt") and results["schema"] == 1
    assert results["sampler"]["num_steps"] == results["num_steps"] == 5 and "_target_" not in results["sampler"]
    assert results["num_samples"] == 16 and results["seconds_per_image"] == pytest.approx(results["seconds"] / 16)
    assert results["features"]["fingerprint"] == features.fingerprint
    assert results["reference"] == {"split": "train", "num_images": 1617}
    nll = results["nll"]
    settings = (nll["split"], nll["num_images"], nll["estimator"], nll["variance"])
    assert settings == ("val", 16, "stratified", "beta_tilde")
    assert nll["terms_timesteps"] == [[0, 1], [1, 4], [4, 16], [16, 63], [63, 251], [251, 1000]]
    assert sum(nll["terms_bpd"]) == pytest.approx(m["nll_kl_bpd"] + m["nll_decoder_bpd"], rel=1e-6)
    # the value is that of the first 16 held-out images under the EMA weights, with the run's seed
    held_out = DigitsDataModule(resolution=8).split("val")[0][:16]
    direct = bits_per_dim(load_checkpoint(trained_run), held_out, num_strata=5, seed=0).summary()
    assert m["nll_bpd"] == pytest.approx(direct["nll_bpd"], rel=1e-5)


def test_evaluate_computes_only_what_metrics_asks_for(trained_run, tmp_path):
    nowhere = tmp_path / "no_classifier"  # fid / kid would load it: nll alone must not
    results = _evaluate([f"ckpt={trained_run}", f"features.path={nowhere}", "metrics=[nll]", "nll.timesteps=2",
                         "nll.num_images=4"], tmp_path / "run")
    assert set(results["metrics"]) == {"nll_bpd", "nll_bpd_stderr", "nll_prior_bpd", "nll_kl_bpd", "nll_decoder_bpd"}
    assert results["features"] is None and results["seconds"] is None and "reference" not in results


def rgb_features(path: str | None = None) -> ClassifierFeatures:
    """features._target_ for the test below: a (random) feature network of 3-channel images."""
    return ClassifierFeatures(NoisyClassifier(3, 10, (16, 32)), (3, 8, 8))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["metrics=[fid,bpd]"], r"metrics=\['fid', 'bpd'\] has unknown bpd: allowed are fid, kid, nll"),
        (["metrics=[]"], "has no metric: allowed are fid, kid, nll"),
        (["num_samples=0"], "num_samples must be a positive integer, got 0"),
        (["num_samples=1"], "fid and kid need num_samples >= 2, got 1"),
        (["nll.timesteps=1000"], "nll.timesteps=1000 exceeds the model's T - 1 = 999 KL terms"),
        (["nll.split=test"], "nll.split=test is not one of train, val, all"),
        (["features._target_=tests.test_evaluate.rgb_features"],
         r"cannot embed the images of .* \(shape \(1, 8, 8\)\): the feature classifier was trained on 3-channel"),
        (["features.path=/nowhere/clf"], "features=classifier needs a feature classifier checkpoint"),
        (["guidance_scale=3"], "guidance_scale=3 needs a model trained with label dropout"),
        (["sampler=ddpm", "sampler.variance=learned", "metrics=[nll]"], "variance=learned needs a model trained with"),
    ],
)
def test_evaluate_refuses_bad_input_before_any_work(trained_run, feature_run, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        _evaluate(_overrides(trained_run, feature_run, tmp_path, *extra), tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "reference").exists()


def test_evaluate_never_overwrites_results(trained_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="results.json already exists: pick another out_dir, or set overwrite=true"):
        _evaluate([f"ckpt={trained_run}", "metrics=[nll]"], out)
    assert (out / "results.json").read_text() == "{}"


@pytest.mark.slow
def test_sweep_of_samplers_and_steps_gives_a_four_row_summary(trained_run, feature_run, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    run_script(
        "evaluate.py", "-m", f"ckpt={trained_run}", f"features.path={feature_run}", "metrics=[fid,kid]",
        "num_samples=16", "kid_subsets=5", f"cache_dir={tmp_path / 'reference'}", "sampler=ddpm,ddim", "sampler.num_steps=3,5",
        f"hydra.sweep.dir={sweep}",
    )
    assert summarize_main([str(sweep)]) == 0
    lines = (sweep / "summary.md").read_text().splitlines()
    assert len(lines) == 2 + 4 and capsys.readouterr().out.startswith("\n".join(lines))
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["sampler"], int(r["num_steps"])) for r in rows] == [("ddim", 3), ("ddim", 5), ("ddpm", 3), ("ddpm", 5)]
    assert all(math.isfinite(float(r["fid"])) and float(r["fid"]) > 0 and r["kid_mean"] for r in rows)
    assert (sweep / "summary.png").is_file()


def test_a_feature_classifier_is_refused_as_a_guidance_classifier(trained_run, feature_run, tmp_path):
    """The FID features' classifier only saw clean images: guiding noisy x_t with it would be silently wrong."""
    from difflab.tasks import sample

    out = tmp_path / "guided"
    with pytest.raises(ConfigError, match=r"trained on clean images only \(noise_aware=false"):
        sample(compose("sample", [f"ckpt={trained_run}", f"classifier={feature_run}", f"output_dir={out}"]))
    assert not out.exists()
