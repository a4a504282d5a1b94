"""dataset=shards: WebDataset tar shards written from any source, read back exactly, read by 2 gloo processes
(each sample once per epoch over both ranks; a loader resumed mid-epoch from its state sees the uninterrupted
run's samples; the same loader state inside a Lightning checkpoint is tests/test_resume.py's), and latent
shards that train without the VAE encoder."""

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
from tests.conftest import TINY_TRAIN

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


def _rank(rank: int, shards: str, out: str) -> None:
    """One of 2 gloo processes: epochs 0 and 1 uninterrupted, then epoch 1 again stopped after one batch and resumed
    by a fresh loader from the stopped one's state (what a checkpoint carries); every rank's labels gathered."""
    import torch.distributed as dist

    from difflab.data import ResumableLoader, ShuffledEpochs
    from difflab.data.images import batch_as_is

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    dm = ShardsDataModule(path=shards, resolution=8, channels=1, batch_size=32, val_fraction=0.04, in_memory=False)
    dm.setup()

    def loader() -> ResumableLoader:
        sampler = ShuffledEpochs(dm.train_source, seed=0, num_replicas=2, rank=rank)
        return ResumableLoader(dm.train_source, dm.split_batch(2), sampler, collate_fn=batch_as_is)

    def epoch(data: ResumableLoader, e: int, stop: int | None = None) -> list[list[int]]:
        data.sampler.set_epoch(e)
        return [batch[1].tolist() for _, batch in zip(range(stop or 99), data)]

    full = loader()
    uninterrupted = [epoch(full, 0), epoch(full, 1)]
    stopped = loader()
    first = epoch(stopped, 1, stop=1)
    requeued = loader()
    requeued.load_state_dict(stopped.state_dict())
    seen = {"uninterrupted": uninterrupted, "resumed": first + epoch(requeued, 1)}
    gathered: list[Any] = [None, None]
    dist.all_gather_object(gathered, seen)
    if rank == 0:
        Path(out, "seen.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


def test_two_gloo_ranks_see_each_sample_once_per_epoch_and_resume_mid_epoch_exactly(shards, tmp_path):
    """96 training samples, 32 per step over 2 ranks (16 each): 3 steps an epoch; stopped after step 1 of epoch 1."""
    torch.multiprocessing.start_processes(_rank, args=(str(shards), str(tmp_path)), nprocs=2, start_method="fork")
    ranks = json.loads((tmp_path / "seen.json").read_text())
    source = NumberedDigits(resolution=8, val_fraction=0.04)
    source.setup()
    train = sorted(source.train_set.labels.tolist())
    for e in (0, 1):
        batches = [rank["uninterrupted"][e] for rank in ranks]
        assert [len(b) for rank in batches for b in rank] == [16] * 6
        assert sorted(y for rank in batches for b in rank for y in b) == train  # each sample once over both ranks
    assert ranks[0]["uninterrupted"][0] != ranks[0]["uninterrupted"][1]  # a new order each epoch
    for rank in ranks:
        assert rank["resumed"] == rank["uninterrupted"][1]  # exactly the uninterrupted epoch's batches


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
