"""Every bad input gets a clear error naming the value and what is allowed, before any step, touching nothing.

One row per bad input in :data:`CASES` (adding one is one line). Each row runs a command in-process
(``compose`` + ``tasks.train`` / ``sample`` / ``export``), or as a script for CLI-level errors, and
asserts (a) the error type and that the message holds each of ``says`` (the bad value and what is
allowed), (b) nothing was written to the command's fresh output dir (so no step ran), and (c) the
existing run dir given to the command (a copy of the ``trained_run`` fixture) is byte-for-byte
unchanged. ``docs/reliability.md`` lists every row with the exact error it gets:
``python -m tests.test_bad_inputs`` runs the rows and rewrites that table, and a test checks it is current.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from hydra.errors import HydraException
from PIL import Image

from difflab.errors import ConfigError
from tests.conftest import ROOT, TEXT_TRAIN, TINY_TRAIN, compose, run_script


@dataclass(frozen=True)
class Case:
    """A bad input: ``command`` (train | sample | evaluate | export in-process; train.py as a script) with ``args``
    and environment variables ``env``, which fails with ``error`` whose message holds every string of ``says``.
    ``{placeholders}`` in args, env and says: see ``_paths``."""

    name: str
    command: str
    args: tuple[str, ...]
    says: tuple[str, ...]
    error: type[BaseException] = ConfigError
    env: tuple[tuple[str, str], ...] = ()


def case(name: str, command: str, args: str, *says: str, error: type[BaseException] = ConfigError,
         env: dict[str, str] | None = None, marks: Any = ()) -> Any:
    return pytest.param(Case(name, command, tuple(args.split()), says, error, tuple((env or {}).items())), id=name,
                        marks=marks)


CASES = [
    case("unknown config option", "train.py", "schedule=quadratic",
         "Could not find 'schedule/quadratic'", "Available options in 'schedule'", "cosine", "linear",
         error=SystemExit),
    case("unknown config key", "train", "trainer.max_stepz=3",
         "max_stepz", "To append to your config use +trainer.max_stepz=3", error=HydraException),
    case("beta out of (0, 1)", "train", "schedule.beta_end=1.5",
         "beta_end=1.5", "0 < beta_start < beta_end < 1"),
    case("betas not increasing", "train", "schedule.beta_start=0.02 schedule.beta_end=0.01",
         "beta_start=0.02, beta_end=0.01", "0 < beta_start < beta_end < 1"),
    case("T < 2", "train", "schedule.num_timesteps=1", "T=1", "T >= 2"),
    case("unknown loss space", "train", "loss.space=pixels", "loss.space must be one of white, data, got 'pixels'"),
    case("unknown prediction space", "train", "prediction_space=pixels",
         "prediction_space must be one of white, data, got 'pixels'"),
    case("image size not divisible by the UNet", "train", "model=small dataset.resolution=18",
         "image size 18", "downsampling factor 4", "use a multiple of 4"),
    case("text UNet without text conditioning", "train", "model=sd_small",
         "model=sd_small", "needs conditioning=text", "use model=small, tiny, ddpm_cifar10, ddpm_256 or adm64"),
    case("text conditioning on data without captions", "train",
         "conditioning=text dataset=hf dataset.path={rgb_dir} dataset.resolution=8",
         "conditioning=text needs captions", "hf a dataset.caption_column"),
    case("image folder without a caption file", "train",
         "conditioning=text dataset=image_folder dataset.path={rgb_dir} dataset.resolution=8",
         "dataset.path={rgb_dir} has no caption file", "{rgb_dir}/metadata.jsonl", "{rgb_dir}/metadata.csv",
         "columns file_name", "and text (its caption)"),
    case("caption row naming a missing image", "train",
         "conditioning=text dataset=image_folder dataset.path={ghost_caption_dir} dataset.resolution=8",
         "{ghost_caption_dir}/metadata.jsonl names 1 file(s) that are not images under "
         "dataset.path={ghost_caption_dir}: gone.png", "fix or remove those rows"),
    case("images without a caption", "train",
         "conditioning=text dataset=image_folder dataset.path={gap_caption_dir} dataset.resolution=8",
         "7 of the 40 images under dataset.path={gap_caption_dir} have no caption",
         "33.png, 34.png, 35.png, 36.png, 37.png, ...", "dataset.allow_missing_captions=true"),
    case("empty prompt list on a text model", "sample", "ckpt={text} prompts=[]",
         "prompts=[] is empty"),
    case("prompt longer than the text encoder's context", "sample",
         "ckpt={text} prompt=seven-seven-seven-seven-seven-seven-seven-seven-seven-seven",
         "is 21 tokens, longer than the text encoder's context of 16 tokens", "shorten it"),
    case("pretrained text encoder path missing", "train",
         "conditioning=text text_encoder=clip text_encoder.path={tmp}/nowhere",
         "text_encoder.path={tmp}/nowhere: missing", "text_encoder/", "tokenizer/", "nothing is downloaded"),
    case("prompt on a model not trained on text", "sample", "ckpt={run} prompt=seven",
         "a prompt was given", "not trained on text", "train with conditioning=text"),
    case("dataset folder missing", "train", "dataset=image_folder dataset.path={tmp}/nowhere",
         "dataset.path={tmp}/nowhere is not a directory", "set dataset.path=DIR to a folder of images"),
    case("dataset folder empty", "train", "dataset=image_folder dataset.path={empty_dir}",
         "dataset.path={empty_dir} holds no images", "looked for .png, .jpg"),
    case("unreadable image", "train", "dataset=image_folder dataset.path={bad_image_dir}",
         "{bad_image_dir}/bad.png is not an image PIL can open", "remove or replace them",
         "or set dataset.skip_bad=true to leave them out"),
    case("zero-byte image", "train", "dataset=image_folder dataset.path={zero_dir}",
         "1 of the 2 images under dataset.path={zero_dir} cannot be trained on", "{zero_dir}/empty.png is empty (0 bytes)",
         "dataset.skip_bad=true"),
    case("images smaller than resolution", "train", "dataset=image_folder dataset.path={tiny_dir}",
         "{tiny_dir}/0.png is 4x4, smaller than dataset.resolution=8", "set dataset.upscale=true"),
    case("truncated image", "train",
         "dataset=image_folder dataset.path={cut_image_dir} dataset.val_fraction=0.5 dataset.batch_size=1",
         "cannot read image {cut_image_dir}/cut.png", "truncated", "remove or replace it"),
    case("num_workers the machine cannot start", "train", "dataset.num_workers=4096",
         "dataset.num_workers=4096 cannot start here", "an integer from 0", "the CPUs this process may use"),
    case("in_memory not an option", "train", "dataset.in_memory=maybe",
         "dataset.in_memory must be auto, true or false, got 'maybe'"),
    case("CIFAR folder without its files", "train", "dataset=cifar10 dataset.path={empty_dir}",
         "does not hold the cifar10 python-version files", "missing batches.meta, data_batch_1",
         "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html)"),
    case("Hugging Face dataset without the image column", "train",
         "dataset=hf dataset.path={rgb_dir} dataset.image_column=img",
         "dataset.image_column='img' is not a column of {rgb_dir}", "it has image"),
    case("shard dir empty", "train", "dataset=shards dataset.path={empty_dir}",
         "dataset.path={empty_dir} holds no shards (*.tar)", "python -m difflab.data.write_shards"),
    case("latent shards without latent=vae", "train",
         "dataset=shards dataset.path={shards_dir} dataset.latents=true dataset.channels=1",
         "dataset.latents=true but the shards under {shards_dir} hold no latents", "latent=vae latent.path=VAE"),
    case("channels not 1 or 3", "train", "dataset.channels=2",
         "dataset.channels must be 1 (grayscale) or 3 (RGB), got 2"),
    case("data channels differ from the setting", "train", "dataset.channels=3",
         "dataset gives items of shape (1, 8, 8), expected (3, 8, 8)"),
    case("checkpoint missing (train)", "train", "ckpt_path={tmp}/nope.ckpt",
         "ckpt_path={tmp}/nope.ckpt does not exist", "give a .ckpt file written by an earlier run"),
    case("sampling precision unknown", "sample", "ckpt={run} precision=fp16",
         "precision=fp16", "fp32, or bf16"),
    case("checkpoint missing (sample)", "sample", "ckpt={tmp}/nope.ckpt",
         "checkpoint not found: {tmp}/nope.ckpt", "give ckpt= a .ckpt file, or a training run dir"),
    case("checkpoint truncated (train)", "train", "ckpt_path={cut_ckpt}",
         "cannot load checkpoint {cut_ckpt}: it is truncated", "use an earlier step_*.ckpt"),
    case("checkpoint truncated (sample)", "sample", "ckpt={cut_ckpt}",
         "cannot load checkpoint {cut_ckpt}: it is truncated", "use an earlier step_*.ckpt"),
    case("checkpoint holds a pickled object (train)", "train", "ckpt_path={pickle_ckpt}",
         "refusing to load {pickle_ckpt}", "pickled Python object (tests.test_bad_inputs.Payload)",
         "weights_only=True"),
    case("checkpoint holds a pickled object (sample)", "sample", "ckpt={pickle_ckpt}",
         "refusing to load {pickle_ckpt}", "pickled Python object (tests.test_bad_inputs.Payload)"),
    case("checkpoint holds a pickled object (export)", "export", "ckpt={pickle_ckpt} out={tmp}/exported",
         "refusing to load {pickle_ckpt}", "pickled Python object (tests.test_bad_inputs.Payload)"),
    case("run_id is the latest link's name", "train", "run_id=latest",
         "run_id='latest' is the name of the link to the newest run", "pick another run_id"),
    case("checkpoint config names a callable (train)", "train", "ckpt_path={evil_ckpt}",
         "refusing to build model._target_='shutil.copyfile'", "difflab's own classes", "nothing was built"),
    case("checkpoint config names a callable (sample)", "sample", "ckpt={evil_ckpt}",
         "refusing to build model._target_='shutil.copyfile'", "difflab's own classes", "nothing was built"),
    case("checkpoint config names a callable (export)", "export", "ckpt={evil_ckpt} out={tmp}/exported",
         "refusing to build model._target_='shutil.copyfile'", "difflab's own classes", "nothing was built"),
    case("checkpoint config names a callable (evaluate)", "evaluate", "ckpt={evil_ckpt} metrics=[nll]",
         "refusing to build model._target_='shutil.copyfile'", "difflab's own classes", "nothing was built"),
    case("checkpoint of another schedule", "train", "ckpt_path={run}/checkpoints/last.ckpt schedule=cosine",
         "other schedule settings", "schedule._target_: difflab.schedule.NoiseSchedule.linear -> "
         "difflab.schedule.NoiseSchedule.cosine", "use the checkpoint's settings"),
    case("checkpoint of another model shape", "train",
         "ckpt_path={run}/checkpoints/last.ckpt model.net.unet.block_out_channels=[16,48]",
         "other model.net settings", "model.net.unet.block_out_channels: [16, 32] -> [16, 48]"),
    case("checkpoint of other channels", "train",
         "ckpt_path={run}/checkpoints/last.ckpt dataset=image_folder dataset.path={rgb_dir} dataset.resolution=8",
         "other dataset.channels settings", "dataset.channels: 1 -> 3"),
    case("resuming a run dir with another schedule", "train", "output_dir={run} schedule=cosine",
         "other schedule settings", "difflab.schedule.NoiseSchedule.linear -> difflab.schedule.NoiseSchedule.cosine",
         "pick another run_id"),
    case("run dir with checkpoints and resume=never", "train", "output_dir={run} resume=never",
         "already holds checkpoints and resume=never", "pick another run_id, or resume=auto"),
    case("ckpt_path into another run's dir", "train", "output_dir={run} ckpt_path={cut_ckpt}",
         "would start a run in {run}, which already holds checkpoints", "pick another run_id"),
    case("resume not an option", "train", "resume=sometimes", "resume=sometimes is not an option", "auto", "never"),
    case("labels on an unconditional model", "sample", "ckpt={run} labels=[1]",
         "labels=[1] given", "unconditional", "train with conditioning=class"),
    case("guidance on an unconditional model", "sample", "ckpt={run} guidance_scale=3",
         "guidance_scale=3", "needs a model trained with label dropout", "use guidance_scale=1"),
    case("guidance without label dropout", "sample", "ckpt={conditional} guidance_scale=2",
         "guidance_scale=2", "p_uncond=0:", "use guidance_scale=1"),
    case("global batch not divisible by world size", "train", "trainer=ddp_cpu dataset.batch_size=31",
         "dataset.batch_size=31", "not divisible by world_size=2", "use a multiple of 2"),
    case("num_samples <= 0", "sample", "ckpt={run} num_samples=0", "num_samples must be a positive integer, got 0"),
    case("out_dir is an existing file (sample)", "sample", "ckpt={run} out_dir={file}",
         "out_dir={file} is an existing file", "give a new or existing directory"),
    case("out is an existing file (export)", "export", "ckpt={run} out={file}",
         "out={file} is an existing file", "give a new or empty directory"),
    case("export into a non-empty dir", "export", "ckpt={run} out={run}",
         "out={run} is not empty", "set overwrite=true"),
    case("latent=vae without a VAE path", "train", "latent=vae",
         "latent=vae needs latent.path=DIR", "outputs/vae/latest/vae from train_vae.py"),
    case("latent path missing", "train", "latent=vae latent.path={tmp}/no_vae",
         "VAE path {tmp}/no_vae does not exist"),
    case("latent path not a VAE", "train", "latent=vae latent.path={run}",
         "{run}", "AutoencoderKL"),
    case("x0 clipping with shaped noise", "train", "noise=covariance sampler.clip_x0=true",
         "sampler.clip_x0 cannot be used with noise=covariance", "set sampler.clip_x0=false, or use noise=iid"),
    case("divergence action not an option", "train", "callbacks.divergence.action=undo",
         "callbacks.divergence.action='undo' is not an option", "('stop', 'skip', 'rollback')"),
    case("class folders beside a stray top-level image", "train",
         "dataset=image_folder dataset.path={mixed_dir} conditioning=class",
         "dataset.path={mixed_dir} holds class sub-folders (cats, dogs)", "1 image(s) at its top level (stray.png)",
         "move the top-level images into a class folder or remove them"),
    case("image over the decompression-bomb limit", "train",
         "dataset=image_folder dataset.path={rgb_dir} dataset.max_image_pixels=100",
         "{rgb_dir}/0.png has 12x12 = 144 pixels", "more than dataset.max_image_pixels=100",
         "PIL.Image.MAX_IMAGE_PIXELS", "raise dataset.max_image_pixels"),
    case("dataset too small for a validation split", "train", "dataset=image_folder dataset.path={small_dir}",
         "dataset.val_fraction=0.05 of 6 images rounds to 0 validation images",
         "use dataset.val_fraction >= 0.1667 (one image), or dataset.val_fraction=0"),
    case("resolution not positive", "train", "dataset.resolution=0",
         "dataset.resolution must be a positive integer", "got 0"),
    case("resolution not an integer", "train", "dataset.resolution=8.5",
         "dataset.resolution must be a positive integer", "got 8.5"),
    case("guidance_scale not finite (nan)", "sample", "ckpt={run} guidance_scale=nan",
         "guidance_scale=nan", "must be a finite number"),
    case("guidance_scale not finite (inf)", "sample", "ckpt={run} guidance_scale=inf",
         "guidance_scale=inf", "must be a finite number"),
    case("classifier_scale not finite", "sample", "ckpt={run} classifier_scale=nan",
         "classifier_scale=nan", "must be a finite number"),
    case("guidance_rescale not finite", "sample", "ckpt={run} guidance_rescale=inf",
         "guidance_rescale=inf", "must be a finite number"),
    case("guidance_rescale outside [0, 1]", "sample", "ckpt={run} guidance_rescale=2",
         "guidance_rescale=2", "must lie in [0, 1]"),
    case("DDIM eta not finite", "sample", "ckpt={run} sampler=ddim sampler.eta=nan",
         "sampler.eta must lie in [0, 1], got eta=nan"),
    case("DDIM eta above 1", "sample", "ckpt={run} sampler=ddim sampler.eta=1.5",
         "sampler.eta must lie in [0, 1], got eta=1.5"),
    case("max_steps = 0", "train", "trainer.max_steps=0",
         "trainer.max_steps=0 is not allowed", "a positive number of optimizer steps", "or -1 (no step limit)"),
    case("max_steps = -1 without max_epochs", "train", "trainer.max_steps=-1",
         "trainer.max_steps=-1 with trainer.max_epochs=-1 sets no end to training", "a positive trainer.max_epochs"),
    case("max_epochs = 0", "train", "trainer.max_epochs=0",
         "trainer.max_epochs=0 is not allowed", "a positive integer, or -1 or null"),
    case("run_id with a path (script)", "train.py", "run_id=../../escaped",
         "run_id='../../escaped' is not a plain name", "a non-empty name without '/'", error=SystemExit),
    case("run_id with a path", "train", "run_id=a/b", "run_id='a/b' is not a plain name", "without '/'"),
    case("run_id empty", "train", "run_id=", "run_id='' is not a plain name", "a non-empty name"),
    case("run_id is ..", "train", "run_id=..", "run_id='..' is not a plain name", "other than '.' and '..'"),
    case("lr not a number", "train", "optimizer.lr=abc",
         "optimizer.lr=abc is not allowed", "a finite number > 0"),
    case("lr negative", "train", "optimizer.lr=-1", "optimizer.lr=-1 is not allowed", "a finite number > 0"),
    case("lr not finite", "train", "optimizer.lr=nan", "optimizer.lr=nan is not allowed", "a finite number > 0"),
    case("weight_decay negative", "train", "optimizer.weight_decay=-0.1",
         "optimizer.weight_decay=-0.1 is not allowed", "a finite number >= 0"),
    case("seed negative (train)", "train", "seed=-1", "seed=-1 is not allowed", "an integer in [0, 4294967295]"),
    case("seed negative (sample)", "sample", "ckpt={run} seed=-1", "seed=-1 is not allowed", "an integer >= 0"),
    case("labels empty", "sample", "ckpt={run} labels=[]",
         "labels=[] names no class", "labels=all", "a non-empty list of class ids / names"),
    case("device=cuda without a GPU", "sample", "ckpt={run} device=cuda",
         "device=cuda, but no CUDA device is available", "allowed are auto, cpu",
         marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")),
    case("device not a device", "sample", "ckpt={run} device=gpu",
         "device=gpu is not a device", "allowed are auto, cpu, cuda, cuda:N"),
    case("val_check_interval = 0", "train", "trainer.val_check_interval=0",
         "trainer.val_check_interval=0 is not allowed", "a positive integer number of steps", "a fraction"),
    case("val_check_interval negative", "train", "trainer.val_check_interval=-5",
         "trainer.val_check_interval=-5 is not allowed", "a positive integer number of steps"),
    case("val_check_interval a fraction without check_val_every_n_epoch", "train", "trainer.val_check_interval=0.5",
         "trainer.val_check_interval=0.5 is not allowed", "with trainer.check_val_every_n_epoch set (now None)"),
    case("out_dir under a file (sample)", "sample", "ckpt={run} out_dir={file}/sub",
         "out_dir={file}/sub cannot be written", "{file} is a file, not a directory",
         "give a directory you can write to"),
    case("cache root under a file (latent cache)", "train", "latent=vae latent.cache=true",
         "the cache dir {file}/cache/latents cannot be written", "{file} is a file", "latent.cache_dir=DIR",
         "DIFFLAB_CACHE=DIR", env={"DIFFLAB_CACHE": "{file}/cache"}),
    case("cache_dir under a file (evaluate)", "evaluate", "ckpt={run} cache_dir={file}/reference",
         "the cache dir {file}/reference cannot be written", "{file} is a file", "set cache_dir=DIR",
         "DIFFLAB_CACHE=DIR", env={"DIFFLAB_CACHE": "{tmp}/cache"}),
]


class Payload:
    """A class instance in a checkpoint: unpickling it would run this module's code."""


def _digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _write_png(path: Path, mode: str = "L", size: int = 12) -> None:
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _paths(tmp: Path, trained_run: Path, runs: dict[str, Path], needed: set[str] | None = None) -> dict[str, Path]:
    """The files a row may name (only those in ``needed``, or all): ``{run}`` a copy of a trained run dir, ``{tmp}``
    a scratch dir, ``{file}`` an existing file, image folders, bad checkpoints, and the other trained ``runs`` (their
    names: :data:`RUNS`)."""
    run = tmp / "run"
    shutil.copytree(trained_run, run)
    paths = {"run": run, "tmp": tmp, "file": tmp / "a_file", "empty_dir": tmp / "empty", "bad_image_dir": tmp / "bad",
             "cut_image_dir": tmp / "cut", "rgb_dir": tmp / "rgb", "cut_ckpt": tmp / "cut.ckpt",
             "pickle_ckpt": tmp / "pickle.ckpt", "mixed_dir": tmp / "mixed", "small_dir": tmp / "small",
             "evil_ckpt": tmp / "evil.ckpt", "zero_dir": tmp / "zero", "tiny_dir": tmp / "tiny",
             "shards_dir": tmp / "shards", "ghost_caption_dir": tmp / "ghost_caption",
             "gap_caption_dir": tmp / "gap_caption", **runs}
    make = set(paths) if needed is None else needed
    if "file" in make:
        paths["file"].write_text("not a directory")
    for name in {"empty_dir", "bad_image_dir", "cut_image_dir", "rgb_dir", "small_dir", "zero_dir", "tiny_dir"} & make:
        paths[name].mkdir()
    if "zero_dir" in make:
        _write_png(paths["zero_dir"] / "good.png")
        (paths["zero_dir"] / "empty.png").write_bytes(b"")
    if "tiny_dir" in make:
        for i in range(40):
            _write_png(paths["tiny_dir"] / f"{i}.png", size=4)
    if "shards_dir" in make:
        from difflab.data import DigitsDataModule
        from difflab.data.write_shards import write_shards

        write_shards(DigitsDataModule(resolution=8), paths["shards_dir"], samples_per_shard=1000)
    if "bad_image_dir" in make:
        _write_png(paths["bad_image_dir"] / "good.png")
        (paths["bad_image_dir"] / "bad.png").write_bytes(b"this is not a png")
    if "cut_image_dir" in make:
        _write_png(paths["cut_image_dir"] / "whole.png")
        _write_png(paths["cut_image_dir"] / "cut.png", size=64)
        data = (paths["cut_image_dir"] / "cut.png").read_bytes()
        (paths["cut_image_dir"] / "cut.png").write_bytes(data[: len(data) // 2])
    if "rgb_dir" in make:
        for i in range(40):
            _write_png(paths["rgb_dir"] / f"{i}.png", mode="RGB")
    for name, captioned in (("ghost_caption_dir", [*range(40), "gone"]), ("gap_caption_dir", range(33))):
        if name in make:  # 40 images with captions for all and a file that is not there (ghost), or the first 33 (gap)
            paths[name].mkdir()
            for i in range(40):
                _write_png(paths[name] / f"{i}.png", mode="RGB")
            (paths[name] / "metadata.jsonl").write_text(
                "".join(json.dumps({"file_name": f"{k}.png", "text": f"image {k}"}) + "\n" for k in captioned))
    if "mixed_dir" in make:  # two class folders and one image beside them
        for name in ("cats", "dogs"):
            (paths["mixed_dir"] / name).mkdir(parents=True)
            for i in range(2):
                _write_png(paths["mixed_dir"] / name / f"{i}.png", mode="RGB")
        _write_png(paths["mixed_dir"] / "stray.png", mode="RGB")
    if "small_dir" in make:  # 6 images: image_folder's val_fraction=0.05 holds out none
        for i in range(6):
            _write_png(paths["small_dir"] / f"{i}.png", mode="RGB")
    if "cut_ckpt" in make:
        data = (run / "checkpoints" / "last.ckpt").read_bytes()
        paths["cut_ckpt"].write_bytes(data[: len(data) // 2])
    if "evil_ckpt" in make:  # its stored config would copy a file over another (tests/test_untrusted.py: more)
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        ckpt["hyper_parameters"]["run_config"]["model"] = {
            "_target_": "shutil.copyfile", "src": str(paths["evil_ckpt"]), "dst": str(tmp / "marker")}
        torch.save(ckpt, paths["evil_ckpt"])
    if "pickle_ckpt" in make:
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        ckpt["hyper_parameters"]["payload"] = Payload()
        torch.save(ckpt, paths["pickle_ckpt"])
    return paths


def _fill(text: str, paths: dict[str, Path]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(paths[m.group(1)]), text)


def _run(c: Case, paths: dict[str, Path], out: Path) -> tuple[str, str]:
    """Run the row's command; returns the name of the error it failed with and its message (fails if it did not)."""
    from difflab.tasks import evaluate, export, sample, train

    args = [_fill(a, paths) for a in c.args]
    with mock.patch.dict(os.environ, {k: _fill(v, paths) for k, v in c.env}):
        if c.command == "train.py":
            proc = run_script("train.py", *TINY_TRAIN, f"hydra.run.dir={out}", *args, check=False)
            assert proc.returncode != 0, proc.stdout
            return f"exit code {proc.returncode}", proc.stderr
        with pytest.raises(c.error) as raised:
            if c.command == "train":
                train(compose("train", [*TINY_TRAIN, f"output_dir={out}", *args]))
            elif c.command == "sample":
                sample(compose("sample", [f"output_dir={out}", "progress=false", "sampler.num_steps=2", *args]))
            elif c.command == "evaluate":
                evaluate(compose("evaluate", [f"output_dir={out}", *args]))
            else:
                export(compose("export", args))
    return type(raised.value).__name__, str(raised.value)


@pytest.fixture(scope="module")
def conditional(tmp_path_factory) -> Path:
    """A class-conditional model trained without label dropout (p_uncond = 0): 1 step."""
    from difflab.tasks import train

    run = tmp_path_factory.mktemp("conditional")
    train(compose("train", [*TINY_TRAIN, "trainer.max_steps=1", "conditioning=class", "conditioning.p_uncond=0",
                            f"output_dir={run}"]))
    return run


RUNS = {"conditional": "conditional", "text": "text_run"}
"""The trained runs a row may name besides ``{run}``: placeholder -> fixture."""


@pytest.mark.parametrize("c", CASES)
def test_bad_input_is_refused_clearly_before_any_step(c: Case, trained_run, request, tmp_path):
    needed = {name for text in (*c.args, *c.says) for name in re.findall(r"\{(\w+)\}", text)}
    runs = {name: request.getfixturevalue(fixture) for name, fixture in RUNS.items() if name in needed}
    paths = _paths(tmp_path, trained_run, runs, needed)
    before = _digest(paths["run"])
    out = tmp_path / "out"
    _, message = _run(c, paths, out)
    for expected in c.says:
        assert _fill(expected, paths) in message, f"{expected!r} not in:\n{message}"
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))  # nothing written: no step ran
    assert _digest(paths["run"]) == before  # the existing run dir is byte-for-byte unchanged


def test_run_id_outside_the_outputs_dir_creates_nothing(tmp_path):
    """train.py run_id=../../escaped, with the default run dir outputs/train/<run_id>: exit 2 before Hydra makes it."""
    proc = run_script("train.py", *TINY_TRAIN, "run_id=../../escaped", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "run_id='../../escaped' is not a plain name" in proc.stderr
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "outputs").exists(), sorted(tmp_path.rglob("*"))


def test_the_docs_list_every_bad_input():
    rows = {line.split(" | ")[0].strip("| "): line for line in _docs_table().splitlines() if line.startswith("| ")}
    for param in CASES:
        c = param.values[0]
        assert c.name in rows, f"docs/reliability.md has no row for {c.name!r}: python -m tests.test_bad_inputs"
        for expected in c.says:
            assert expected.replace("|", "\\|") in rows[c.name], f"{c.name}: {expected!r} is not in its docs row"


DOCS = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- bad-inputs: python -m tests.test_bad_inputs writes this table -->", "<!-- bad-inputs end -->"


def _docs_table() -> str:
    doc = DOCS.read_text()
    return doc[doc.index(BEGIN) + len(BEGIN) : doc.index(END)]


def markdown_table(tmp: Path, trained_run: Path, runs: dict[str, Path]) -> str:
    """Each row's command and the exact error it gets, paths shown as their {placeholders}."""
    lines = ["| bad input | command | error |", "|---|---|---|"]
    for param in CASES:
        c = param.values[0]
        scratch = tmp / str(len(lines))
        scratch.mkdir()
        paths = _paths(scratch, trained_run, runs)
        error, message = _run(c, paths, scratch / "out")
        message = message.split("Config search path")[0]  # Hydra's search path: where this clone lives
        lines_of = [line.strip() for line in message.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
        message = " ".join(lines_of)
        for name, path in sorted(paths.items(), key=lambda kv: -len(str(kv[1]))):
            message = message.replace(str(path), "{" + name + "}")
        script = c.command if c.command.endswith(".py") else f"{c.command}.py"
        command = " ".join([*(f"{k}={v}" for k, v in c.env), script, *c.args])
        lines.append(f"| {c.name} | `{command}` | {error}: {message.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


def write_docs_table() -> None:
    """Run every row (with a freshly trained run) and put the table into docs/reliability.md."""
    import tempfile

    from difflab.tasks import train

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        run_script("train.py", *TINY_TRAIN, f"hydra.run.dir={root / 'trained'}")
        train(compose("train", [*TINY_TRAIN, "trainer.max_steps=1", "conditioning=class", "conditioning.p_uncond=0",
                                f"output_dir={root / 'conditional'}"]))
        train(compose("train", [*TEXT_TRAIN, f"output_dir={root / 'text'}"]))
        table = markdown_table(root, root / "trained", {"conditional": root / "conditional", "text": root / "text"})
    doc = DOCS.read_text()
    DOCS.write_text(doc[: doc.index(BEGIN) + len(BEGIN)] + "\n" + table + "\n" + doc[doc.index(END) :])


if __name__ == "__main__":  # imported by name, so the pickled class is tests.test_bad_inputs.Payload, as under pytest
    from tests.test_bad_inputs import write_docs_table as write

    write()
