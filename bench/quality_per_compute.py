"""Quality per compute (issue #20.1): a Frechet distance in the feature space of an independent digit classifier.

    python -m bench.quality_per_compute RUN_OR_CKPT ... [--settings ancestral:50,ddim:50:trailing,...]
        [--train NAME="OVERRIDES" ...] [--seeds 0,1] [--sigma-rels 0.05,0.08] [--num-samples 899]

The scale: scikit-learn's MLPClassifier (hidden layers 128 and 64, seed 0), trained on one half of the 1,797
digits (898, a fixed permutation) at the samples' resolution and cached as plain arrays in
outputs/bench/quality_per_compute/; the features are its penultimate (64-unit ReLU) layer. It is not the
project's feature classifier (train_classifier.py), so the project cannot tune itself to it. FD: torchmetrics'
Frechet distance between ``--num-samples`` samples and the classifier's half; the floor is the other half
(899 held-out real digits) against it, i.e. what a perfect generator scores at that sample size.

Samples come from sample.py's own code path (its config, sampler and :class:`SamplingPlan`; EMA weights,
seed 0). A setting is ``SAMPLER:STEPS[:SPACING][:KEY=VALUE...]`` with SAMPLER a conf/sampler option and KEY one
of its keys (``dpmpp_2m:20:clip_x0=true``).

``--train NAME="OVERRIDES"`` trains ``python train.py OVERRIDES seed=S`` for every seed of ``--seeds`` into
outputs/bench/quality_per_compute/NAME_sS (reused when its last.ckpt is there) and prints the wall time of each;
``--sigma-rels`` also scores each run's post-hoc EMA of those widths (python -m difflab.posthoc_ema).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import ROOT, compose, frechet_distance
from difflab.build import instantiate_node, load_checkpoint
from difflab.tasks.posthoc_ema import posthoc_ema
from difflab.tasks.sample import sampling_plan

OUT = ROOT / "outputs" / "bench" / "quality_per_compute"
DEFAULT_SETTINGS = "ancestral:50,ddim:50:trailing,ddim:50:leading,ddim:10:trailing,ddim:10:leading"


def halves(resolution: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """All 1,797 digits at ``resolution`` ((M, 1, H, W) in [-1, 1], labels (M,)) split by a fixed permutation:
    (898 for the classifier and the reference, 899 held out)."""
    from difflab.data import DigitsDataModule

    images, labels = DigitsDataModule(resolution=resolution, val_fraction=0.1).split("all")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    first, second = order[: len(images) // 2], order[len(images) // 2 :]
    return (images[first], labels[first]), (images[second], labels[second])


class ClassifierFeatures(nn.Module):
    """The penultimate layer of an MLP digit classifier: h = relu(W2 relu(W1 x + b1) + b2), x the flattened image."""

    num_features = 64

    def __init__(self, weights: list[np.ndarray], biases: list[np.ndarray]) -> None:
        super().__init__()
        self.layers = [(torch.from_numpy(w).double(), torch.from_numpy(b).double()) for w, b in zip(weights, biases)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 1, H, W) in [-1, 1] -> (N, 64) float64."""
        h = images.double().flatten(1)
        for w, b in self.layers:
            h = torch.relu(h @ w + b)
        return h


def independent_features(resolution: int) -> ClassifierFeatures:
    """The cached classifier of this resolution (trained on the first half of :func:`halves` if not cached)."""
    path = OUT / f"classifier_{resolution}.npz"
    if not path.is_file():
        # scikit-learn's MLP rather than a project network: the scale must not share code or choices with difflab.
        from sklearn.neural_network import MLPClassifier

        (x, y), (x_held, y_held) = halves(resolution)
        clf = MLPClassifier(hidden_layer_sizes=(128, 64), alpha=1e-3, max_iter=500, random_state=0)
        clf.fit(x.flatten(1).numpy(), y.numpy())
        accuracy = clf.score(x_held.flatten(1).numpy(), y_held.numpy())
        print(f"independent classifier ({resolution}x{resolution}): held-out accuracy {accuracy:.3f}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, w1=clf.coefs_[0], b1=clf.intercepts_[0], w2=clf.coefs_[1], b2=clf.intercepts_[1])
    arrays = np.load(path, allow_pickle=False)
    return ClassifierFeatures([arrays["w1"], arrays["w2"]], [arrays["b1"], arrays["b2"]])


def draw(ckpt: str, setting: str, num_samples: int, seed: int) -> tuple[torch.Tensor, float]:
    """``num_samples`` images (N, C, H, W) as ``python sample.py ckpt=CKPT sampler=... seed=SEED`` draws them; s/image."""
    name, steps, *rest = setting.split(":")
    overrides = [f"ckpt={ckpt}", f"sampler={name}", f"sampler.num_steps={steps}", f"num_samples={num_samples}",
                 f"seed={seed}", "batch_size=256", "progress=false", f"output_dir={OUT}"]
    # after the steps: a spacing (leading) or sampler keys (clip_x0=true, karras=true)
    cfg = compose("sample", overrides + [f"sampler.{r}" if "=" in r else f"sampler.spacing={r}" for r in rest])
    module = load_checkpoint(cfg.ckpt)
    plan = sampling_plan(cfg, instantiate_node(cfg.sampler, "sampler"), module, torch.device("cpu"))
    start = time.perf_counter()
    images = plan.draw(module, cfg)
    return images.float().clamp(-1, 1), (time.perf_counter() - start) / num_samples


def trained(name: str, overrides: str, seed: int) -> Path:
    """The run dir of ``python train.py OVERRIDES seed=SEED`` (trained now unless its last.ckpt exists)."""
    run_dir = OUT / f"{name}_s{seed}"
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        start = time.perf_counter()
        subprocess.run([sys.executable, "train.py", *shlex.split(overrides), f"seed={seed}", "logger=csv",
                        "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True)
        print(f"trained {run_dir.name}: {time.perf_counter() - start:.0f} s wall", flush=True)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="train.py run dirs or .ckpt files")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS,
                        help="comma-separated SAMPLER:STEPS[:SPACING][:KEY=VALUE...]")
    parser.add_argument("--train", action="append", default=[], metavar='NAME="OVERRIDES"')
    parser.add_argument("--seeds", default="0,1", help="training seeds of --train")
    parser.add_argument("--sigma-rels", default="", help="comma-separated post-hoc EMA widths to score as well")
    parser.add_argument("--num-samples", type=int, default=899)
    parser.add_argument("--sample-seed", type=int, default=0)
    args = parser.parse_args()

    runs = [Path(r) for r in args.runs]
    for spec in args.train:
        name, _, overrides = spec.partition("=")
        runs += [trained(name, overrides, int(s)) for s in args.seeds.split(",")]
    ckpts: list[tuple[str, str]] = []
    for run in runs:
        ckpts.append((str(run), "model EMA"))
        for sigma_rel in filter(None, args.sigma_rels.split(",")):
            out = run / "checkpoints" / f"posthoc_ema_{sigma_rel}.ckpt"
            if not out.is_file():
                posthoc_ema(compose("posthoc_ema", [f"run={run}", f"sigma_rel={sigma_rel}"]))
            ckpts.append((str(out), f"post-hoc EMA {sigma_rel}"))

    features: dict[int, ClassifierFeatures] = {}
    reference: dict[int, torch.Tensor] = {}
    for ckpt, ema in ckpts:
        resolution = load_checkpoint(ckpt).image_shape[-1]
        if resolution not in features:
            features[resolution] = independent_features(resolution)
            (reference[resolution], _), (held_out, _) = halves(resolution)
            floor = frechet_distance(held_out, reference[resolution], features[resolution])
            print(f"floor ({resolution}x{resolution}): FD(899 held-out digits, the other 898) = {floor:.2f}", flush=True)
            print("| checkpoint | EMA | sampler:steps[:spacing] | FD | s/image |\n|---|---|---|---|---|", flush=True)
        for setting in args.settings.split(","):
            images, seconds = draw(ckpt, setting, args.num_samples, args.sample_seed)
            fd = frechet_distance(images, reference[resolution], features[resolution])
            print(f"| {ckpt} | {ema} | {setting} | {fd:.2f} | {seconds:.4f} |", flush=True)


if __name__ == "__main__":
    main()
