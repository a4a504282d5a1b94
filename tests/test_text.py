"""conditioning=text (issue #16): captions, tokenizer, caption dropout, a tiny train.py + sample.py with prompts
(its bad prompts: rows of tests/test_bad_inputs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab.errors import ConfigError
from difflab.text import (
    DIGIT_TEMPLATES,
    DIGIT_WORDS,
    HELD_OUT_TEMPLATE,
    ScratchTextEncoder,
    TextConditioning,
    build_tokenizer,
    digit_caption,
    digit_captions,
)
from tests.conftest import compose


def test_digit_captions_vary_name_the_digit_and_keep_the_held_out_phrasing_out():
    labels = torch.arange(10).repeat(100)
    captions = digit_captions(labels, seed=0)
    assert captions == digit_captions(labels, seed=0) and captions != digit_captions(labels, seed=1)
    assert len(set(captions)) == 10 * len(DIGIT_TEMPLATES)  # every phrasing of every digit occurs
    held_out = {digit_caption(HELD_OUT_TEMPLATE, d) for d in range(10)}
    assert not held_out & set(captions)
    for caption, d in zip(captions[:50], labels[:50].tolist()):
        assert str(d) in caption.split() or digit_caption("{w}", d) in caption.split()


def _conditioning(captions: list[str], p_uncond: float = 0.5, max_length: int = 8) -> TextConditioning:
    return TextConditioning(ScratchTextEncoder(max_length=max_length, tokenizer=build_tokenizer(captions)), p_uncond)


def test_tokenizer_pads_marks_unknown_words_and_refuses_long_prompts_at_sampling_only():
    cond = _conditioning(["a handwritten seven", "the digit 3"])
    ids = cond.token_ids(["a handwritten seven", "a picture of a seven", ""])
    vocab = cond.tokenizer.get_vocab()
    assert ids.shape == (3, 8)
    assert ids[0, :5].tolist() == [vocab["[BOS]"], vocab["a"], vocab["handwritten"], vocab["seven"], vocab["[EOS]"]]
    assert ids[1, 2:4].tolist() == [vocab["[UNK]"]] * 2  # "picture", "of": never in a training caption
    assert ids[2, :3].tolist() == [vocab["[BOS]"], vocab["[EOS]"], vocab["[PAD]"]]
    long = "seven " * 7
    assert cond.token_ids([long]).shape == (1, 8)  # training truncates
    with pytest.raises(ConfigError, match="9 tokens, longer than the text encoder's context of 8 tokens"):
        cond.token_ids([long], strict=True)


def test_caption_dropout_replaces_captions_by_the_empty_prompt_at_rate_p_uncond():
    cond = _conditioning(["a handwritten seven"], p_uncond=0.3)
    batch = (torch.zeros(2000, 1, 2, 2), torch.zeros(2000), ["a handwritten seven"] * 2000)
    ids = cond.training_condition(batch, torch.Generator().manual_seed(0))
    dropped = (ids == cond.null_condition()).all(dim=1).float().mean().item()
    assert abs(dropped - 0.3) < 0.03
    assert torch.equal(ids, cond.training_condition(batch, torch.Generator().manual_seed(0)))


@pytest.mark.slow
def test_train_then_sample_from_prompts_with_the_checkpoint_alone(text_run, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from difflab.build import load_checkpoint
    from difflab.tasks import sample

    module = load_checkpoint(text_run)
    saved = PreTrainedTokenizerFast.from_pretrained(text_run / "tokenizer")
    assert module.conditioning.tokenizer.get_vocab() == saved.get_vocab()  # the checkpoint carries the tokenizer
    fresh = ScratchTextEncoder(**{k: v for k, v in module.hparams["run_config"]["text_encoder"].items()
                                  if k != "_target_"}).build()
    moved = [not torch.equal(a, b) for a, b in zip(module.net.text_encoder.parameters(), fresh.parameters())]
    assert any(moved)  # the encoder was trained with the UNet (fresh: the same init seed would be needed to match)

    out = tmp_path / "samples"
    result = sample(compose("sample", [f"ckpt={text_run}", "prompts=[a handwritten seven,the digit 3]",
                                       "guidance_scale=3", "negative_prompt=the digit 1", "num_samples=4",
                                       "sampler.num_steps=3", "progress=false", f"out_dir={out}"]))
    saved_npz = np.load(out / "samples.npz")
    assert saved_npz["arr_0"].shape == (4, 8, 8, 1)
    assert saved_npz["prompts"].tolist() == ["a handwritten seven", "the digit 3"] * 2
    again = sample(compose("sample", [f"ckpt={text_run}", "prompt=the digit 3", "guidance_scale=3",
                                      "negative_prompt=the digit 1", "num_samples=2", "seed=0",
                                      "sampler.num_steps=3", "progress=false", f"out_dir={tmp_path / 'again'}"]))
    np.testing.assert_array_equal(again["images"][1], result["images"][1])  # sample i depends on (seed, i, prompt)


def test_evaluate_scores_prompt_following_beside_fid(text_run, feature_run, features, tmp_path, capsys):
    from difflab.data import DigitsDataModule
    from difflab.metrics import classifier_accuracy
    from difflab.tasks import evaluate

    results = evaluate(compose("evaluate", [
        f"ckpt={text_run}", f"features.path={feature_run}", "metrics=[fid]", "num_samples=20", "sampler.num_steps=3",
        f"cache_dir={tmp_path / 'reference'}", "progress=false", f"output_dir={tmp_path / 'eval'}"]))
    assert 0.0 <= results["metrics"]["prompt_accuracy"] <= 1.0 and results["metrics"]["fid"] > 0
    assert "prompt_accuracy" in capsys.readouterr().out
    # The oracle: real held-out digits scored through the same function under the digit their caption names. The
    # 20-step feature classifier reads ~2/3 of real digits right (chance: 0.1); a 6-step text model is too weak to
    # assert more of its samples than the range.
    dm = DigitsDataModule(resolution=8, captions=True)
    dm.setup()
    named = torch.tensor([_named_digit(c) for c in dm.val_set.captions])
    assert torch.equal(named, dm.val_set.labels)  # each caption names its image's digit
    assert classifier_accuracy(features, dm.val_set.images, named) >= 0.5
    assert classifier_accuracy(features, dm.val_set.images, (named + 1) % 10) <= 0.2  # prompts naming another digit


def _named_digit(caption: str) -> int:
    """The digit a digits caption names, read from its words (numeral or word)."""
    words = [w for w in caption.split() if w.isdigit() or w in DIGIT_WORDS]
    return int(words[0]) if words[0].isdigit() else DIGIT_WORDS.index(words[0])
