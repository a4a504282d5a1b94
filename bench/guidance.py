"""Guidance on the digits: label accuracy and Frechet distance against the guidance strength.

    python -m bench.guidance CKPT [--classifier RUN] [--num-samples 500] [--scales 0 1 2 3 5] [--cg-scales 0 1 2 5]

An independent judge: scikit-learn's LogisticRegression on the real digits' training split (8x8
pixels), a model the generator never trained with; its accuracy on the held-out split is printed
first. For each classifier-free guidance scale w (and, with --classifier, each classifier-guidance
scale s on top of w = 1), it draws --num-samples images with labels=all (balanced classes) from
the default ancestral 50-step sampler, and reports the share the judge assigns to the requested
label, the Frechet distance to all real digits (8x8 pixel space) and the seconds per image.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from bench.common import frechet_distance
from difflab.build import load_checkpoint, load_classifier
from difflab.data import DigitsDataModule
from difflab.guidance import balanced_labels
from difflab.samplers import DDPM


def pixels8(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [-1, 1] -> (N, 64), area-averaged to the digits' native 8x8."""
    return F.adaptive_avg_pool2d(images.float(), 8).flatten(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--classifier", default=None)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 3, 5])
    parser.add_argument("--cg-scales", type=float, nargs="+", default=[0, 1, 2, 5])
    args = parser.parse_args()

    module = load_checkpoint(args.ckpt)
    dm = DigitsDataModule(resolution=module.net.sample_shape[-1], val_fraction=0.1)
    dm.setup()
    judge = LogisticRegression(max_iter=5000).fit(pixels8(dm.train_set.images).numpy(), dm.train_set.labels.numpy())
    val_acc = judge.score(pixels8(dm.val_set.images).numpy(), dm.val_set.labels.numpy())
    print(f"judge: logistic regression on 8x8 pixels, held-out accuracy {val_acc:.3f}")
    real = torch.cat([dm.train_set.images, dm.val_set.images])
    labels = balanced_labels(10, args.num_samples)
    sampler = DDPM(num_steps=50)

    runs = [(f"CFG w={w:g}", {"guidance_scale": w}) for w in args.scales]
    if args.classifier:
        clf = load_classifier(args.classifier).net
        runs += [(f"classifier s={s:g} (w=1)", {"classifier": clf, "classifier_scale": s}) for s in args.cg_scales]
    print("| guidance | label accuracy | FD to digits | s/image |\n|---|---|---|---|")
    for name, guidance in runs:
        start = time.perf_counter()
        x = module.generate(sampler, len(labels), seed=0, batch_size=250, labels=labels, **guidance)
        seconds = (time.perf_counter() - start) / len(labels)
        acc = (torch.as_tensor(judge.predict(pixels8(x).numpy())) == labels).float().mean().item()
        print(f"| {name} | {acc:.3f} | {frechet_distance(x, real):.3f} | {seconds:.3f} |", flush=True)


if __name__ == "__main__":
    main()
