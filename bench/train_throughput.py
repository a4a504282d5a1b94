"""Training throughput: difflab's Lightning training step vs a plain PyTorch loop (same UNet, schedule, EMA, data).

    python -m bench.train_throughput [--steps 60] [--rounds 3] [--model small] [--resolution 16] [--batch 64]

Both loops draw t and eps, run the UNet, take an AdamW step with gradient clipping and update the
EMA with torch._foreach_lerp_. Rounds alternate between the two (step times drift 10-15% on these
shared machines), the first 10 steps of every round are warm-up, and throughput is the batch size
over the median step time (the time between the starts of consecutive steps), which a stray
background process does not move the way it moves a mean.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch

from bench.common import compose
from difflab.build import build_module

WARMUP = 10


class StepTimer(L.Callback):
    """Start times of the training steps (the last interval ends at on_train_end)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, module) -> None:
        self.starts.append(time.perf_counter())


def median_step(starts: list[float]) -> float:
    steps = sorted(b - a for a, b in zip(starts[WARMUP:], starts[WARMUP + 1 :]))
    return steps[len(steps) // 2]


def difflab_images_per_second(cfg, steps: int) -> float:
    from hydra.utils import instantiate

    torch.manual_seed(0)
    dm = instantiate(cfg.dataset)
    module = build_module(cfg)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=WARMUP + steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0, callbacks=[timer],
    )
    trainer.fit(module, datamodule=dm)
    return cfg.dataset.batch_size / median_step(timer.starts)


def plain_images_per_second(cfg, steps: int) -> float:
    from hydra.utils import instantiate

    torch.manual_seed(0)
    dm = instantiate(cfg.dataset)
    dm.setup()
    module = build_module(cfg)  # only for its freshly initialised UNet and schedule
    unet, abar = module.net.unet, module.schedule.alphas_cumprod.float()
    ema = [p.detach().clone() for p in unet.parameters()]
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.optimizer.lr)
    images, batch_size = dm.train_set.images, cfg.dataset.batch_size
    starts = []
    for _ in range(WARMUP + steps):
        starts.append(time.perf_counter())
        x0 = images[torch.randint(0, len(images), (batch_size,))]
        t = torch.randint(0, 1000, (batch_size,))
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        loss = (unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample - eps).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.995)
    starts.append(time.perf_counter())
    return batch_size / median_step(starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="small")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--batch", type=int, default=None, help="dataset.batch_size (default: the dataset's)")
    args = parser.parse_args()
    cfg = compose("train", [f"model={args.model}", f"dataset.resolution={args.resolution}", "output_dir=/unused"]
                  + ([f"dataset.batch_size={args.batch}"] if args.batch else []))
    ours, plain = [], []
    for _ in range(args.rounds):
        ours.append(difflab_images_per_second(cfg, args.steps))
        plain.append(plain_images_per_second(cfg, args.steps))
        print(f"round: difflab {ours[-1]:.1f} img/s, plain loop {plain[-1]:.1f} img/s", flush=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(
        f"model={args.model} resolution={args.resolution} batch={cfg.dataset.batch_size} threads={torch.get_num_threads()}\n"
        f"median: difflab {med(ours):.1f} img/s, plain loop {med(plain):.1f} img/s, ratio {med(ours) / med(plain):.3f}"
    )


if __name__ == "__main__":
    main()
