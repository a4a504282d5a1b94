"""Frechet distance vs number of model evaluations (NFE) for the samplers of issue #8, with seconds per image.

    python -m bench.sampler_zoo outputs/train/latest [--samplers ancestral,ddim,dpmpp_2m,unipc,euler_ancestral,heun]
        [--nfe 5,10,20,50,100] [--extra ddim:25,ancestral:1000,ddim:1000] [--num-samples 250]
        [--features outputs/feature_classifier/latest]

Each sampler runs at the step count that gives each NFE (Heun evaluates the model 2 n - 1 times in n steps, so it
gets n = (NFE + 1) // 2 and reports its real NFE); the same seed, so every row starts from the same noise. FD is the
Frechet distance to all 1,797 digits in their native 8x8 pixel space (bench/common.py), every row at the same sample
count (FD is biased upward at small counts, so rows of other counts would not compare); the first row is its floor,
the same number of real training digits. Seconds per image is the sampling wall time over the images (batch 250),
on a machine whose load is printed with the table. The samples are kept in outputs/bench/sampler_zoo/ (npz).
``--extra`` adds single sampler:NFE rows (issue #6's DDIM 25 and the 1000-step rows). With ``--features`` each row
also gets the FID in the feature classifier's space (evaluate.py's features=classifier) against the training split,
so one sampling pass serves issue #8's FD table and issue #6's sampler x steps table.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from bench.common import ROOT, frechet_distance, real_digits, sampler_config
from difflab.build import load_checkpoint
from difflab.data import DigitsDataModule
from difflab.images import to_uint8
from difflab.metrics import ClassifierFeatures, extract_features, fid_kid


def steps_for(name: str, nfe: int) -> int:
    """The num_steps that gives ``nfe`` model evaluations (or the nearest below, for Heun)."""
    return (nfe + 1) // 2 if name in ("heun", "kdpm2", "kdpm2_ancestral") else nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--samplers", default="ancestral,ddim,dpmpp_2m,unipc,euler_ancestral,heun")
    parser.add_argument("--nfe", default="5,10,20,50,100")
    parser.add_argument("--extra", default="ddim:25,ancestral:1000,ddim:1000")
    parser.add_argument("--num-samples", type=int, default=250)
    parser.add_argument("--features", default=None, help="a feature classifier (train_classifier.py run) for FID")
    args = parser.parse_args()
    rows = [(name, int(nfe)) for name in args.samplers.split(",") for nfe in args.nfe.split(",")]
    rows += [(name, int(nfe)) for name, nfe in (row.split(":") for row in args.extra.split(",") if row)]

    module = load_checkpoint(args.ckpt)
    real = real_digits(module.image_shape[-1])
    out = ROOT / "outputs" / "bench" / "sampler_zoo"
    out.mkdir(parents=True, exist_ok=True)
    n = args.num_samples
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:n]
    floor = frechet_distance(real[pick], real)
    fid: Callable[[torch.Tensor], str] = lambda images: ""  # noqa: E731
    if args.features:
        features = ClassifierFeatures.from_checkpoint(args.features).eval()
        train = DigitsDataModule(resolution=module.image_shape[-1]).split("train")[0]
        reference = extract_features(features, train, 256)
        fid = lambda images: f" {fid_kid(extract_features(features, images, 256), reference)['fid']:.4f} |"  # noqa: E731
    print(f"checkpoint {args.ckpt}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {n} samples per row")
    head = " FID (classifier) |" if args.features else ""
    print(f"| sampler | NFE | steps | FD (8x8 pixels) |{head} s/image |\n|---|---|---|---|{'---|' if head else ''}---|")
    real_fid = fid(train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]]) if args.features else ""
    print(f"| {n} real digits (floor) | | | {floor:.3f} |{real_fid} |")
    for name, nfe in rows:
        steps = steps_for(name, nfe)
        sampler = sampler_config(name, f"num_steps={steps}")
        start = time.perf_counter()
        fake = module.generate(sampler, n, seed=0, batch_size=250)
        seconds = (time.perf_counter() - start) / n
        real_nfe = 2 * steps - 1 if name in ("heun", "kdpm2", "kdpm2_ancestral") else steps
        np.savez(out / f"{name}_{real_nfe}.npz", arr_0=to_uint8(fake), seconds_per_image=seconds)
        print(f"| {name} | {real_nfe} | {steps} | {frechet_distance(fake, real):.3f} |{fid(fake)} {seconds:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
