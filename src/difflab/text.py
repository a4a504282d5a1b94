"""Text conditioning (``conditioning=text``), as in Stable Diffusion (Rombach et al. 2022): captions -> token ids ->
the last hidden states of a CLIP text transformer, which a ``diffusers.UNet2DConditionModel`` cross-attends to.

The encoder is a ``text_encoder`` option: :class:`ScratchTextEncoder` (a small ``CLIPTextModel`` trained with the
UNet, its word-level tokenizer built from the training captions and stored as JSON data in the run config, so every
checkpoint carries it) or :class:`PretrainedTextEncoder` (a frozen CLIPTextModel + CLIPTokenizer from a local Stable
Diffusion checkout). transformers is imported only here, inside the functions that need it: other runs never pay
for its import. Training drops each caption to the empty prompt with probability ``p_uncond``; classifier-free
guidance's unconditional pass is the empty prompt (or ``negative_prompt``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.errors import ConfigError
from difflab.guidance import Conditioning

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "{n}", "{w}", "a handwritten {w}", "a handwritten {n}", "the digit {n}", "the digit {w}", "a sloppy {n}",
    "a neat {w}", "the number {w}", "{w} written by hand",
)
"""The phrasings of the digits' training captions: {n} the numeral, {w} the word; one drawn per image."""
HELD_OUT_TEMPLATE = "a picture of a {w}"
"""A phrasing never used in training (bench/text_prompt_following.py measures it beside the seen ones)."""
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
"""The scratch tokenizer's special tokens: ids 0-3."""


SAMPLE_PROMPTS = 8
"""How many distinct training captions a run takes as its grids' prompts when none are given."""


def sample_prompts(captions: Sequence[str], count: int = SAMPLE_PROMPTS) -> list[str]:
    """The first ``count`` distinct captions, in order: the default prompts of the training-time grids."""
    return list(dict.fromkeys(captions))[:count]


def digit_caption(template: str, digit: int) -> str:
    """The caption of ``digit`` in ``template`` ({n}: the numeral, {w}: the word)."""
    return template.format(n=digit, w=DIGIT_WORDS[digit])


def digit_captions(labels: Tensor, seed: int) -> list[str]:
    """One caption per label (N,): a phrasing of :data:`DIGIT_TEMPLATES` drawn per image from ``seed``."""
    which = torch.randint(len(DIGIT_TEMPLATES), (len(labels),), generator=torch.Generator().manual_seed(seed))
    return [digit_caption(DIGIT_TEMPLATES[int(k)], int(d)) for k, d in zip(which, labels)]


def build_tokenizer(captions: Sequence[str]) -> str:
    """A word-level tokenizer of ``captions`` (lower-cased words and punctuation; unseen words -> [UNK]; [BOS] ...
    [EOS]) as the ``tokenizers`` library's JSON. Hand-chosen word level: the captions' vocabulary is small, and
    whole words make the held-out phrasing's unseen words plainly [UNK]."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer

    tokenizer = Tokenizer(WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer.train_from_iterator(list(captions), WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[(t, tokenizer.token_to_id(t)) for t in ("[BOS]", "[EOS]")]
    )
    return tokenizer.to_str()


class TextEncoder:
    """A ``text_encoder`` option: its tokenizer (a transformers fast tokenizer), width and network."""

    trainable: bool = True

    def tokenizer(self) -> Any:
        """The transformers tokenizer (``model_max_length`` = the encoder's context)."""
        raise NotImplementedError

    @property
    def width(self) -> int:
        """The width of the hidden states (the UNet's ``cross_attention_dim``)."""
        raise NotImplementedError

    def build(self) -> nn.Module:
        """The CLIPTextModel."""
        raise NotImplementedError


class ScratchTextEncoder(TextEncoder):
    """A small CLIPTextModel built from a CLIPTextConfig and trained with the UNet (as latent diffusion's LAION
    model trained its transformer from scratch); ``tokenizer`` is the JSON of :func:`build_tokenizer`."""

    def __init__(
        self, max_length: int = 16, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
        intermediate_size: int = 128, tokenizer: str | None = None,
    ) -> None:
        for key, value in {"max_length": max_length, "hidden_size": hidden_size, "num_layers": num_layers,
                           "num_heads": num_heads, "intermediate_size": intermediate_size}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"text_encoder.{key} must be a positive integer, got {value!r}")
        if max_length < 3:
            raise ConfigError(f"text_encoder.max_length={max_length}: it must hold [BOS], a word and [EOS] (>= 3)")
        if hidden_size % num_heads:
            raise ConfigError(f"text_encoder.hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        self.max_length, self.hidden_size, self.num_layers = max_length, hidden_size, num_layers
        self.num_heads, self.intermediate_size, self.tokenizer_json = num_heads, intermediate_size, tokenizer

    def tokenizer(self) -> Any:
        from transformers import PreTrainedTokenizerFast

        if self.tokenizer_json is None:
            raise ConfigError("text_encoder=scratch has no tokenizer yet: train.py builds it from the training captions")
        return PreTrainedTokenizerFast(
            tokenizer_object=_tokenizer_from_json(self.tokenizer_json), model_max_length=self.max_length,
            pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        )

    @property
    def width(self) -> int:
        return self.hidden_size

    def build(self) -> nn.Module:
        from transformers import CLIPTextConfig, CLIPTextModel

        vocab = json.loads(self.tokenizer_json)["model"]["vocab"] if self.tokenizer_json else {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        config = CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_length, pad_token_id=vocab["[PAD]"], bos_token_id=vocab["[BOS]"],
            eos_token_id=vocab["[EOS]"], projection_dim=self.hidden_size,
        )
        return CLIPTextModel(config)


def _tokenizer_from_json(text: str) -> Any:
    """A ``tokenizers.Tokenizer`` from its JSON (data only: loading it runs no code)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


class PretrainedTextEncoder(TextEncoder):
    """A frozen pretrained CLIPTextModel + CLIPTokenizer from ``path``, a Stable Diffusion checkout's ``text_encoder/``
    and ``tokenizer/`` folders (read locally: nothing is downloaded)."""

    trainable = False

    def __init__(self, path: str) -> None:
        root = Path(str(path)).expanduser()
        missing = [name for name in ("text_encoder/config.json", "tokenizer") if not (root / name).exists()]
        if missing:
            raise ConfigError(
                f"text_encoder.path={path}: missing {', '.join(str(root / m) for m in missing)}; text_encoder=clip needs a "
                "local Stable Diffusion checkout holding text_encoder/ (a CLIPTextModel: config.json + weights) and "
                "tokenizer/ (a CLIPTokenizer); nothing is downloaded"
            )
        self.path = root
        self.config = json.loads((root / "text_encoder" / "config.json").read_text())
        if "hidden_size" not in self.config:
            raise ConfigError(f"text_encoder.path={path}: text_encoder/config.json is not a CLIPTextModel config (no hidden_size)")

    def tokenizer(self) -> Any:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(self.path / "tokenizer", local_files_only=True)

    @property
    def width(self) -> int:
        return int(self.config["hidden_size"])

    def build(self) -> nn.Module:
        from transformers import CLIPTextModel

        return CLIPTextModel.from_pretrained(self.path / "text_encoder", local_files_only=True).requires_grad_(False)


class TextConditioning(Conditioning):
    """Captions (``conditioning=text``): the UNet cross-attends to ``text_encoder``'s last hidden states (B, L, D) of
    the caption; training replaces each caption by the empty prompt with probability ``p_uncond``.
    ``sample_prompts``: the prompts of the training-time sample grids (one row each)."""

    def __init__(self, text_encoder: TextEncoder, p_uncond: float = 0.1, sample_prompts: Sequence[str] = ()) -> None:
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"conditioning.p_uncond must lie in [0, 1), got {p_uncond}")
        self.text_encoder, self.p_uncond, self.sample_prompts = text_encoder, p_uncond, list(sample_prompts)
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The encoder's transformers tokenizer, built on first use."""
        if self._tokenizer is None:
            self._tokenizer = self.text_encoder.tokenizer()
        return self._tokenizer

    @property
    def max_length(self) -> int:
        """The encoder's context: tokens per caption, special tokens included."""
        return int(self.tokenizer.model_max_length)

    def unet_config(self) -> dict[str, int]:
        """Cross-attention to hidden states of the encoder's width."""
        return {"cross_attention_dim": self.text_encoder.width}

    def too_long(self, captions: Sequence[str]) -> list[tuple[str, int]]:
        """The captions longer than the context, with their lengths in tokens."""
        lengths = [len(ids) for ids in self.tokenizer(list(captions), verbose=False)["input_ids"]]
        return [(c, n) for c, n in zip(captions, lengths) if n > self.max_length]

    def warn_truncated(self, captions: Sequence[str]) -> None:
        """Warn once (at the start of training) about training captions the context truncates."""
        too_long = self.too_long(captions)
        if too_long:
            warnings.warn(
                f"{len(too_long)} of {len(captions)} training captions are longer than the text encoder's context of "
                f"{self.max_length} tokens (e.g. {too_long[0][0]!r}, {too_long[0][1]} tokens): training truncates them "
                "(raise text_encoder.max_length to keep them whole)", stacklevel=2,
            )

    def token_ids(self, captions: Sequence[str], strict: bool = False) -> Tensor:
        """Token ids (B, max_length) of ``captions``, padded to the context as Stable Diffusion does; longer captions
        are truncated (training; :meth:`warn_truncated` said so), or refused with ``strict`` (sampling)."""
        if strict and (too_long := self.too_long(captions)):
            raise ConfigError(
                f"prompt {too_long[0][0]!r} is {too_long[0][1]} tokens, longer than the text encoder's context of "
                f"{self.max_length} tokens ([BOS] and [EOS] included): shorten it (training truncated longer "
                "captions; sampling refuses them)"
            )
        return self.tokenizer(
            list(captions), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )["input_ids"]

    def null_condition(self, negative_prompt: str = "") -> Tensor:
        """The unconditional pass's token ids (max_length,): the empty prompt, or a negative prompt."""
        return self.token_ids([negative_prompt], strict=True)[0]

    def condition(self, batch: Sequence[Any]) -> Tensor:
        """The token ids (B, L) of a batch's captions, on the images' device."""
        return self.token_ids(self.captions_of(batch)).to(batch[0].device)

    def training_condition(self, batch: Sequence[Any], generator: torch.Generator | None = None) -> Tensor:
        """The captions' token ids with each caption replaced by the empty prompt with probability ``p_uncond``."""
        captions = self.captions_of(batch)
        drop = torch.rand(len(captions), device=batch[0].device, generator=generator) < self.p_uncond
        kept = ["" if d else c for c, d in zip(captions, drop.tolist())]
        return self.token_ids(kept).to(batch[0].device)

    @staticmethod
    def captions_of(batch: Sequence[Any]) -> list[str]:
        """The captions of a batch (images, labels, captions)."""
        if len(batch) < 3:
            raise ConfigError("conditioning=text needs a dataset with captions (docs/conditioning.md#text)")
        return list(batch[2])


def cross_attention_unet(unet: dict[str, Any]) -> dict[str, Any]:
    """The UNet2DConditionModel of a UNet2DModel config: the same sizes, its self-attention blocks cross-attending
    blocks (and diffusers' cross-attention mid block); other configs unchanged."""
    if unet.get("_target_") != "diffusers.UNet2DModel":
        return {}
    cross = {"AttnDownBlock2D": "CrossAttnDownBlock2D", "AttnUpBlock2D": "CrossAttnUpBlock2D"}
    return {
        "_target_": "diffusers.UNet2DConditionModel",
        "down_block_types": [cross.get(b, b) for b in unet["down_block_types"]],
        "up_block_types": [cross.get(b, b) for b in unet["up_block_types"]],
    }

