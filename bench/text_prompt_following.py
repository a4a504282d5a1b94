"""Text conditioning on the digits (issue #16): prompt following against guidance, and the cost of text.

    python -m bench.text_prompt_following [--run DIR] [--per-prompt 5] [--scales 1 2 3 5] [--skip-cost | --cost-only]

Without --run it trains the default text run first (``python train.py conditioning=text run_id=bench_text``: the
default budget, pixel space) and measures that; ``--run`` takes any text run, a latent one (``latent=vae``)
included: samples are judged after decoding. An independent judge, scikit-learn's LogisticRegression on the real
digits' training split (8x8 pixels), a model the generator never trained with, reads the digit of each sample; a
sample is right when it is the digit its prompt names. Prompts: every digit in three phrasings seen in training and
in the held-out one (:data:`difflab.text.HELD_OUT_TEMPLATE`), ``--per-prompt`` samples each, ancestral 50 steps.

Cost: training images/s (forward, backward and AdamW step of a 64-image batch) and sampling s/image (ancestral 50
steps at w = 3, 64 images) of conditioning=text against conditioning=class at the same UNet size (model=small),
timed alternately in this process.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from bench.common import ROOT, compose
from bench.guidance import pixels8
from difflab.build import build_module, load_checkpoint, training_config, with_captions
from difflab.data import DigitsDataModule
from difflab.samplers import DDPM
from difflab.text import DIGIT_TEMPLATES, HELD_OUT_TEMPLATE, digit_caption

SEEN = (DIGIT_TEMPLATES[2], DIGIT_TEMPLATES[4], DIGIT_TEMPLATES[1])
"""Three phrasings seen in training: "a handwritten seven", "the digit 7", "seven"."""


def prompt_following(run: str, per_prompt: int, scales: list[float]) -> None:
    """The judge's accuracy on the named digit, per phrasing and guidance scale (a markdown table)."""
    from sklearn.linear_model import LogisticRegression

    module = load_checkpoint(run)
    shape = module.net.sample_shape  # a latent model's samples are judged decoded, at the images' resolution
    resolution = shape[-1] if module.latent is None else module.latent.decode(torch.zeros(1, *shape)).shape[-1]
    dm = DigitsDataModule(resolution=resolution, val_fraction=0.1)
    dm.setup()
    judge = LogisticRegression(max_iter=5000).fit(pixels8(dm.train_set.images).numpy(), dm.train_set.labels.numpy())
    print(f"judge: logistic regression on 8x8 pixels, held-out accuracy "
          f"{judge.score(pixels8(dm.val_set.images).numpy(), dm.val_set.labels.numpy()):.3f}")
    templates = [*SEEN, HELD_OUT_TEMPLATE]
    digits = torch.arange(10).repeat_interleave(per_prompt)
    prompts = [digit_caption(t, int(d)) for t in templates for d in digits]
    named = digits.repeat(len(templates))
    ids = module.conditioning.token_ids(prompts, strict=True)
    sampler = DDPM(num_steps=50)
    print("| guidance w | " + " | ".join(f'"{t.format(n=7, w="seven")}"' for t in templates) + " | seen (mean) | s/image |")
    print("|---" * (len(templates) + 3) + "|")
    for w in scales:
        start = time.perf_counter()
        x = module.generate(sampler, len(prompts), seed=0, batch_size=200, labels=ids, guidance_scale=w)
        seconds = (time.perf_counter() - start) / len(prompts)
        right = (torch.as_tensor(judge.predict(pixels8(x).numpy())) == named).float().view(len(templates), -1).mean(1)
        cells = " | ".join(f"{a:.3f}" for a in right.tolist())
        print(f"| {w:g} | {cells} | {right[: len(SEEN)].mean():.3f} | {seconds:.3f} |", flush=True)


def cost(repeats: int = 5, steps: int = 10) -> None:
    """Training images/s and sampling s/image of text vs class conditioning at model=small (medians of ``repeats``)."""
    modules, batches = {}, {}
    for kind in ("class", "text"):
        cfg = with_captions(compose("train", [f"conditioning={kind}", "output_dir=unused"]))
        dm = DigitsDataModule(resolution=16, val_fraction=0.1, captions=kind == "text")
        dm.setup()
        torch.manual_seed(0)
        modules[kind] = build_module(training_config(cfg, dm.class_names, dm.train_set.captions))
        batches[kind] = dm.train_set.__getitems__(list(range(64)))  # (images, labels[, captions]) as training sees
    train_rates: dict[str, list[float]] = {k: [] for k in modules}
    sample_times: dict[str, list[float]] = {k: [] for k in modules}
    for _ in range(repeats):
        for kind, module in modules.items():
            optimizer = torch.optim.AdamW(module.net.parameters(), lr=1e-4)
            batch = batches[kind]
            start = time.perf_counter()
            for _ in range(steps):
                y = module.conditioning.training_condition(batch, None)
                losses, _, _ = module.losses(batch[0], module.net, y)
                optimizer.zero_grad()
                losses.mean().backward()
                optimizer.step()
            train_rates[kind].append(steps * len(batch[0]) / (time.perf_counter() - start))
            y = batch[1] if kind == "class" else module.conditioning.condition(batch)
            start = time.perf_counter()
            module.generate(DDPM(num_steps=50), 64, labels=y, guidance_scale=3.0)
            sample_times[kind].append((time.perf_counter() - start) / 64)
    print("| conditioning (model=small) | parameters (UNet + encoder) | train img/s (median) | sampling s/image (w=3) |")
    print("|---|---|---|---|")
    for kind, module in modules.items():
        params = sum(p.numel() for p in module.net.parameters())
        print(f"| {kind} | {params / 1e6:.2f}M | {statistics.median(train_rates[kind]):.1f} | "
              f"{statistics.median(sample_times[kind]):.3f} |")
    ratio = statistics.median(train_rates["class"]) / statistics.median(train_rates["text"])
    sratio = statistics.median(sample_times["text"]) / statistics.median(sample_times["class"])
    print(f"text / class: {ratio:.2f}x training time per image, {sratio:.2f}x sampling time per image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a trained conditioning=text run (default: train one)")
    parser.add_argument("--per-prompt", type=int, default=5)
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--cost-only", action="store_true", help="only the text vs class cost (no run needed)")
    args = parser.parse_args()
    if args.cost_only:
        cost()
        return
    run = args.run
    if run is None:
        run = str(ROOT / "outputs" / "train" / "bench_text")
        subprocess.run([sys.executable, str(ROOT / "train.py"), "conditioning=text", "run_id=bench_text"], check=True)
    prompt_following(run, args.per_prompt, args.scales)
    if not args.skip_cost:
        cost()


if __name__ == "__main__":
    main()
