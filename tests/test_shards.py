"""dataset=shards: WebDataset tar shards written from any source, read back exactly, trained on by 2 gloo processes
(each sample once per epoch over both ranks; a run resumed mid-epoch sees the uninterrupted run's samples), and
latent shards that train without the VAE encoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from difflab.data import Catalog, DigitsDataModule
from difflab.data.digits import ResizedDigits
from difflab.data.shards import ShardsDataModule
from difflab.data.write_shards import write_shards
from difflab.errors import ConfigError
from tests.conftest import TINY_TRAIN, run_script

N = 100


class NumberedDigits(DigitsDataModule):
    """The first N digits, each labelled by its index, so a batch's labels say which samples it holds."""

    def catalog(self) -> Catalog:
        raw = super().catalog().items.raw[:N]
        return Catalog(ResizedDigits(raw, self.resolution), torch.arange(N), [], [f"digit {i}" for i in range(N)])


class RecordSeen(L.Callback):
    """Appends (global step, rank, labels) of every training batch to <output_dir>/seen.jsonl."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        with open(self.path / "seen.jsonl", "a") as f:
            f.write(json.dumps([trainer.global_step + 1, trainer.global_rank, batch[1].tolist()]) + "\n")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "numbered"
    meta = write_shards(NumberedDigits(resolution=8), out, samples_per_shard=30)
    assert meta["count"] == N and sorted(p.name for p in out.glob("*.tar"))[-1] == "shard-000003.tar"
    return out


def test_shards_hold_the_source_images_labels_and_captions_in_order(shards):
    import webdataset as wds

    dm = ShardsDataModule(path=str(shards), resolution=8, channels=1, batch_size=4, val_fraction=0.04,
                          in_memory=False, num_workers=1)
    dm.setup()
    source = NumberedDigits(resolution=8, val_fraction=0.04)
    source.setup()
    assert dm.train_set.labels.tolist() == source.train_set.labels.tolist()  # the same split of the same order
    assert (dm.train_set.images - source.train_set.images).abs().max() <= 0.5 / 127.5 + 1e-6  # 8-bit PNGs
    assert dm.captions == [f"digit {i}" for i in range(N)]
    keys = [s["__key__"] for s in wds.WebDataset(sorted(map(str, shards.glob("*.tar"))), shardshuffle=False)]
    assert keys == [f"{i:09d}" for i in range(N)]  # any WebDataset pipeline reads them


@pytest.mark.parametrize("bad", ["empty dir", "zero-byte shard", "not a tar"])
def test_bad_shard_dirs_are_refused_naming_the_problem(tmp_path, bad):
    if bad != "empty dir":
        (tmp_path / "a.tar").write_bytes(b"" if bad == "zero-byte shard" else b"x" * 700)
    dm = ShardsDataModule(path=str(tmp_path), resolution=8, channels=1, batch_size=1)
    says = {"empty dir": "holds no shards", "zero-byte shard": "a.tar is not a readable .*: empty file", "not a tar": "a.tar is not a readable"}
    with pytest.raises(ConfigError, match=says[bad]):
        dm.setup()


@pytest.mark.slow
def test_two_ranks_see_each_sample_once_per_epoch_and_resume_mid_epoch_exactly(shards, tmp_path):
    """2 gloo processes, 96 training samples, 32 per step: 3 steps an epoch; resumed from step 4's checkpoint."""
    common = [*TINY_TRAIN, "trainer=ddp_cpu", "dataset=shards", f"dataset.path={shards}", "dataset.channels=1",
              "dataset.val_fraction=0.04", "dataset.in_memory=false", "dataset.num_workers=0",  # 2 ranks fill 2 cores
              "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.model_checkpoint.save_top_k=-1",
              "+callbacks.record._target_=tests.test_shards.RecordSeen"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for run, extra in ((full, []), (resumed, [f"ckpt_path={full / 'checkpoints' / 'step_000004.ckpt'}"])):
        run.mkdir()
        run_script("train.py", *common, f"hydra.run.dir={run}", f"+callbacks.record.path={run}", *extra)

    def seen(run: Path) -> dict[tuple[int, int], list[int]]:
        rows = [json.loads(line) for line in (run / "seen.jsonl").read_text().splitlines()]
        return {(step, rank): labels for step, rank, labels in rows}

    uninterrupted, after = seen(full), seen(resumed)
    train = sorted(NumberedDigits(resolution=8, val_fraction=0.04).catalog().labels[  # the 96 training indices
        torch.randperm(N, generator=torch.Generator().manual_seed(0))[4:]].tolist())
    for epoch in (range(1, 4), range(4, 7)):
        labels = [y for step in epoch for rank in (0, 1) for y in uninterrupted[(step, rank)]]
        assert sorted(labels) == train  # every training sample exactly once over both ranks
    assert set(after) == {(s, r) for s in (5, 6) for r in (0, 1)}
    assert after == {key: uninterrupted[key] for key in after}  # the resumed run sees the uninterrupted run's batches


def test_latent_shards_train_without_the_encoder(stage1, tmp_path, monkeypatch):
    from difflab.latent import LatentSpace
    from difflab.tasks import train
    from tests.conftest import compose

    vae = stage1[0] / "vae"
    latent = LatentSpace(str(vae), (1, 8, 8))
    meta = write_shards(DigitsDataModule(resolution=8), tmp_path / "latents", samples_per_shard=1000, latent=latent)
    assert meta["latent"]["shape"] == list(latent.shape) and len(list((tmp_path / "latents").glob("*.tar"))) == 2
    calls = []
    monkeypatch.setattr(LatentSpace, "encode", lambda self, x, g=None: calls.append(x.shape) or 1 / 0)
    overrides = [*TINY_TRAIN, "trainer.max_steps=2", "dataset=shards", f"dataset.path={tmp_path / 'latents'}",
                 "dataset.channels=1", "dataset.latents=true", "latent=vae", f"latent.path={vae}",
                 "latent.scaling_factor=1.0", f"output_dir={tmp_path / 'run'}"]
    metrics = train(compose("train", overrides))
    assert calls == [] and torch.isfinite(torch.as_tensor(metrics["train/loss"]))
    with pytest.raises(ConfigError, match="dataset serves VAE latents .* train with latent=vae"):
        train(compose("train", [o for o in overrides if not o.startswith("latent")] + [f"output_dir={tmp_path / 'x'}"]))
