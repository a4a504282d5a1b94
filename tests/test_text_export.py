"""Issue #16's export: a latent text model loads as diffusers' StableDiffusionPipeline and draws as sample.py."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from difflab.build import build_module, instantiate_node, load_checkpoint
from difflab.export import export_diffusers
from difflab.seeding import PerSampleNoise
from difflab.tasks import export, train
from difflab.tasks.sample import sampling_plan
from tests.conftest import TINY_TRAIN, compose

STEPS, GUIDANCE = 4, 7.5
"""DDIM steps (a divisor of T = 1000: then diffusers' t' = t - T // steps is difflab's next grid timestep) and w."""
TOLERANCE = 1e-3
"""max |difference| of the [0, 1] images; measured 1.5e-7 (clip) and 2.1e-7 (scratch): float32 rounding (the two
batch the guided and unguided passes in opposite order; difflab's step coefficients come from float64 abar)."""


@pytest.fixture(scope="module")
def clip_checkout(tmp_path_factory) -> Path:
    """A tiny local "Stable Diffusion checkout" for text_encoder=clip: text_encoder/ (a random 2-layer CLIPTextModel)
    and tokenizer/ (a CLIPTokenizer of a hand-written vocab.json + merges.txt: characters, two merges)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd_checkout")
    chars = list(string.ascii_lowercase + string.digits)
    vocab = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    (root / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 32})
    )
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1,
    )
    CLIPTextModel(config).save_pretrained(root / "text_encoder")
    return root


def _train_and_export(tmp_path: Path, vae_dir: Path, *overrides: str) -> tuple[Path, Path, dict]:
    run, out = tmp_path / "run", tmp_path / "exported"
    train(compose("train", [*TINY_TRAIN, "conditioning=text", "latent=vae", f"latent.path={vae_dir}", "logger=none",
                            "objective=eps", *overrides, f"output_dir={run}"]))  # the guidance check's calibration
    manifest = export(compose("export", [f"ckpt={run}", f"out={out}"]))
    return run, out, manifest


def _max_abs_diff(run: Path, out: Path, prompt: str, negative_prompt: str | None = None) -> tuple[float, float]:
    """max |sample.py's image - the pipeline's| on [0, 1] for 2 samples of ``prompt`` (DDIM, STEPS, GUIDANCE, the
    same initial latents), and max |the pipeline's guided - unguided image| (that guidance matters here)."""
    module = load_checkpoint(run)
    args = [f"ckpt={run}", "sampler=ddim", "sampler.spacing=trailing", f"sampler.num_steps={STEPS}", f"prompt={prompt}",
            f"guidance_scale={GUIDANCE}", "num_samples=2", "seed=0", "progress=false", "out_dir=/unused"]
    if negative_prompt is not None:
        args.append(f"negative_prompt={negative_prompt}")
    cfg = compose("sample", args)
    plan = sampling_plan(cfg, instantiate_node(cfg.sampler, "sampler"), module, torch.device("cpu"))
    ours = (plan.draw(module, cfg) + 1) / 2
    latents = PerSampleNoise.for_indices(cfg.seed, range(2)).randn(module.net.sample_shape)  # sample.py's x_T

    pipeline = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    draw = lambda w: pipeline(  # noqa: E731
        prompt=[prompt] * 2, negative_prompt=None if negative_prompt is None else [negative_prompt] * 2,
        num_inference_steps=STEPS, guidance_scale=w, latents=latents.clone(), output_type="pt",
    ).images
    theirs = draw(GUIDANCE)
    assert theirs.shape == ours.shape == (2, 1, 8, 8)
    return (ours - theirs).abs().max().item(), (theirs - draw(1.0)).abs().max().item()


@pytest.mark.slow
def test_a_latent_clip_text_model_exports_as_a_stable_diffusion_pipeline_that_samples_as_sample_py(
    stage1, clip_checkout, tmp_path
):
    run, out, manifest = _train_and_export(
        tmp_path, stage1[0] / "vae", "text_encoder=clip", f"text_encoder.path={clip_checkout}"
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "difflab.json", "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert manifest["pipeline"] == "StableDiffusionPipeline" and manifest["stable_diffusion_pipeline_blockers"] == []
    module = load_checkpoint(run)
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == float(module.latent.scaling_factor)  # the pipeline decodes D(x0 / s)
    diff, guidance_effect = _max_abs_diff(run, out, "the digit 3")
    print(f"clip: max |sample.py - pipeline| = {diff:.2e}; guidance moves the images by {guidance_effect:.2e}")
    assert diff < TOLERANCE and guidance_effect > 5 * TOLERANCE


@pytest.mark.slow
def test_a_scratch_text_model_exports_its_own_tokenizer_and_samples_as_sample_py(stage1, tmp_path):
    run, out, manifest = _train_and_export(tmp_path, stage1[0] / "vae")
    assert manifest["pipeline"] == "StableDiffusionPipeline"
    module = load_checkpoint(run)
    index = json.loads((out / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]  # a name transformers 4 and 5 both have
    pipeline = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    prompts = ["a handwritten seven", "a picture of a seven", ""]  # known words, unknown words, the null prompt
    ids = pipeline.tokenizer(prompts, padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, module.conditioning.token_ids(prompts))  # tokenized exactly as in training
    diff, guidance_effect = _max_abs_diff(run, out, "a handwritten seven", negative_prompt="the digit 1")
    print(f"scratch: max |sample.py - pipeline| = {diff:.2e}; guidance moves the images by {guidance_effect:.2e}")
    assert diff < TOLERANCE and guidance_effect > 5 * TOLERANCE


def test_a_pixel_space_text_model_exports_its_parts_and_says_why_not_stable_diffusion_pipeline(
    clip_checkout, tmp_path
):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    cfg = compose("train", ["model=tiny", "dataset.resolution=8", "conditioning=text", "text_encoder=clip",
                            f"text_encoder.path={clip_checkout}", "output_dir=/unused"])
    module = build_module(cfg)
    manifest = export_diffusers(module, tmp_path, {"global_step": 0})
    parts = ["difflab.json", "scheduler", "text_encoder", "tokenizer", "unet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == parts  # no vae/, no model_index.json
    assert manifest["pipeline"] is None and manifest["stable_diffusion_pipeline_blockers"] == [
        "pixel-space (StableDiffusionPipeline decodes every sample with vae/: train with latent=vae)"]
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    ids = tokenizer(["the digit 3", ""], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    assert torch.equal(ids, module.conditioning.token_ids(["the digit 3", ""]))
    unet, text_encoder = UNet2DConditionModel.from_pretrained(tmp_path / "unet"), CLIPTextModel.from_pretrained(
        tmp_path / "text_encoder")
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 900])
    with torch.no_grad():
        exported = unet.eval()(x, t, encoder_hidden_states=text_encoder.eval()(ids).last_hidden_state).sample
        assert torch.equal(exported, module.ema.module.eval()(x, t, ids))  # the EMA network, bit for bit
