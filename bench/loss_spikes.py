"""How large healthy loss "spikes" are: z-scores of training-batch losses of a trained model against the last W batches.

The divergence guard's ``z_score`` flags a step whose loss is more than z standard deviations above
the mean of the last ``window`` steps. This draws ``--batches`` training batches exactly as training
does (the run's batch size, t and noise from a per-batch generator), evaluates the loss of a
checkpoint's raw weights without updating them (the stationary late phase of a run, where false
alarms would hurt) and reports the largest z and how often z exceeds each threshold.

    python -m bench.loss_spikes ckpt=outputs/train/latest --batches 600
"""

from __future__ import annotations

import argparse
import math

import torch
from omegaconf import OmegaConf

from difflab.build import instantiate_node, load_checkpoint
from difflab.seeding import derived_generator

THRESHOLDS = (3.0, 4.0, 5.0, 6.0, 8.0)


def batch_losses(ckpt: str, batches: int, seed: int = 0) -> list[float]:
    """The mean training loss of ``batches`` batches (B,) drawn like training batches, at the checkpoint's weights."""
    module = load_checkpoint(ckpt).eval()
    data = instantiate_node(OmegaConf.create(module.hparams["run_config"]["dataset"]), "dataset", seed=seed)
    data.setup("fit")
    images, labels = data.train_set.images, data.train_set.labels
    losses = []
    with torch.no_grad():
        for i in range(batches):
            generator = derived_generator(seed, 1, i)
            idx = torch.randint(0, len(images), (data.batch_size,), generator=generator)
            y = labels[idx] if module.num_classes else None
            per_sample, _, _ = module.losses(images[idx], module.net, y, generator)
            losses.append(float(per_sample.mean()))
    return losses


def z_scores(losses: list[float], window: int) -> list[float]:
    """z_i = (L_i - mean(L_{i-W..i-1})) / std(L_{i-W..i-1}) for i >= W (the guard's rule)."""
    out = []
    for i in range(window, len(losses)):
        past = losses[i - window : i]
        mean = sum(past) / window
        std = math.sqrt(sum((x - mean) ** 2 for x in past) / (window - 1))
        out.append((losses[i] - mean) / std)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="ckpt=PATH: a train.py checkpoint or run dir")
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--window", type=int, default=100)
    args = parser.parse_args()
    losses = batch_losses(args.ckpt.removeprefix("ckpt="), args.batches)
    z = z_scores(losses, args.window)
    mean = sum(losses) / len(losses)
    print(f"{len(losses)} batch losses: mean {mean:.4f}, min {min(losses):.4f}, max {max(losses):.4f}")
    print(f"z over a window of {args.window}: {len(z)} values, max {max(z):.2f}")
    for threshold in THRESHOLDS:
        print(f"  z > {threshold:g}: {sum(v > threshold for v in z)} of {len(z)}")


if __name__ == "__main__":
    main()
