"""Data at scale: loader throughput per source and path, training memory on 1,000 vs 100,000 PNGs, shard I/O.

    python -m bench.data loaders [--rounds 3]          # img/s of each source's training loader, 32 and 64 px
    python -m bench.data memory [--sizes 1000 100000]  # peak RSS and time to the first optimizer step of train.py
    python -m bench.data shards [--n 20000]            # shard write speed, read throughput with 1 and 2 processes
    python -m bench.data headers [--n 5000]            # the header check per file: PNG IHDR read vs PIL.Image.open

Every dataset is synthetic (python -m difflab.data.synthetic's generator), written under --work (default
/tmp/difflab_bench_data; the 100,000-PNG folder is ~1.2 GB). Loader throughput is images per second over
the second epoch of the training loader (batch 64, at most --batches batches), so it is what the
data path can feed a model, not training speed; variants alternate within each round (these machines
drift 10-15% between runs) and the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT

WORK = Path("/tmp/difflab_bench_data")


def synthetic_sets(work: Path, resolution: int, n: int) -> dict[str, dict]:
    """The same n synthetic images as an image folder, a HF imagefolder, CIFAR files (32 px) and shards."""
    from difflab.data import ImageFolderDataModule
    from difflab.data.synthetic import write_cifar, write_folder
    from difflab.data.write_shards import write_shards

    folder, shards = work / f"folder{resolution}_{n}", work / f"shards{resolution}_{n}"
    if not folder.is_dir():
        write_folder(folder, n, resolution, classes=10, captions=True)
    if not shards.is_dir():
        write_shards(ImageFolderDataModule(path=str(folder), resolution=resolution), shards, num_workers=2)
    sets = {
        "image_folder": {"_target_": "difflab.data.ImageFolderDataModule", "path": str(folder)},
        "hf": {"_target_": "difflab.data.hf.HFDataModule", "path": str(folder), "label_column": "label"},
        "shards": {"_target_": "difflab.data.shards.ShardsDataModule", "path": str(shards)},
    }
    if resolution == 32:
        if not (work / "cifar-10-batches-py").is_dir():
            write_cifar(work, n, "cifar10", 10)
        sets["cifar10"] = {"_target_": "difflab.data.cifar.CifarDataModule", "path": str(work)}
    return sets


def loader_rate(settings: dict, batches: int) -> float:
    """Images per second of the DataModule ``settings``' training loader over its second epoch (the first one
    starts the workers), at most ``batches`` batches of it."""
    from hydra.utils import instantiate

    dm = instantiate(settings)
    dm.setup("fit")
    loader = dm.train_dataloader()
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for _, batch in zip(range(batches), loader):
            n += batch[0].shape[0]
    rate = n / (time.perf_counter() - start)
    dm.teardown("fit")
    return rate


def loaders(args: argparse.Namespace) -> None:
    from difflab.data import DigitsDataModule

    digits = {"_target_": "difflab.data.DigitsDataModule", "resolution": 16, "batch_size": 64, "hflip": True}
    dm = DigitsDataModule(resolution=16)
    dm.setup()
    print(f"digits 16 px: in_memory=auto decodes into memory: {dm.decoded_in_memory}")
    variants = {"digits 16 px in memory": {**digits, "in_memory": True},
                **{f"digits 16 px lazy, {w} workers": {**digits, "in_memory": False, "num_workers": w} for w in (0, 2)}}
    for resolution in (32, 64):
        for name, source in synthetic_sets(Path(args.work), resolution, args.n).items():
            common = {**source, "resolution": resolution, "batch_size": 64, "hflip": True}
            variants[f"{name} {resolution} px lazy, 2 workers"] = {**common, "in_memory": False, "num_workers": 2}
            if name in ("image_folder", "cifar10") or resolution == 32:
                variants[f"{name} {resolution} px in memory"] = {**common, "in_memory": True, "num_workers": 2}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, settings in variants.items():
            rates[name].append(loader_rate(settings, args.batches))
    print(f"| loader (batch 64, 2nd epoch, <= {args.batches} batches, {os.cpu_count()} CPUs) | img/s (median of {args.rounds}) |")
    print("|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):,.0f} |")


FIRST_STEP = """
import json, os, resource, sys, time
import lightning as L
class FirstStep(L.Callback):
    done = False
    def on_train_batch_end(self, trainer, *args):
        if not self.done:
            self.done = True
            print("FIRST_STEP", time.time() - float(os.environ["BENCH_START"]), flush=True)
    def on_train_end(self, trainer, *args):
        print("SELF_RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def memory(args: argparse.Namespace) -> None:
    """train.py (model=tiny, 64x64, 20 steps) on each folder size: peak RSS of the training process and of the
    largest process (GNU time: a worker or the training process), seconds from launch to the first optimizer step."""
    from difflab.data.synthetic import write_folder

    work = Path(args.work)
    (work / "bench_first_step.py").write_text(FIRST_STEP)
    print("| PNGs (64x64 RGB) | peak RSS, training process (MB) | largest process incl. workers (MB) | "
          "first optimizer step (s) | in memory |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        folder = work / f"flat64_{n}"
        if not folder.is_dir():
            write_folder(folder, n, 64, classes=0, captions=False)
        cmd = ["/usr/bin/time", "-f", "MAXRSS %M", sys.executable, str(ROOT / "train.py"), "model=tiny",
               "dataset=image_folder", f"dataset.path={folder}", "dataset.resolution=64", "dataset.batch_size=16",
               "trainer.max_steps=20", "trainer.val_check_interval=20", "trainer.limit_val_batches=1",
               "callbacks.sample_grid.every_n_steps=1000", "logger=none", "trainer.enable_progress_bar=false",
               "+callbacks.first._target_=bench_first_step.FirstStep", f"hydra.run.dir={work / f'run{n}'}"]
        if (work / f"run{n}").is_dir():  # a finished run would resume and train nothing
            subprocess.run(["rm", "-r", str(work / f"run{n}")], check=True)
        env = {**os.environ, "PYTHONPATH": f"{work}:{ROOT / 'src'}", "BENCH_START": str(time.time())}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0:
            sys.exit(out[-3000:])
        rss = int(out.split("MAXRSS ")[1].split()[0]) / 1024
        main_rss = int(out.split("SELF_RSS ")[1].split()[0]) / 1024
        first = float(out.split("FIRST_STEP ")[1].split()[0])
        in_memory = 4 * n * 3 * 64 * 64 <= 256 * 2**20
        print(f"| {n:,} | {main_rss:.0f} | {rss:.0f} | {first:.1f} | {in_memory} |", flush=True)


def _read_rank(path: str, rank: int, world: int, queue) -> None:
    from difflab.data import ShuffledEpochs
    from difflab.data.images import batch_as_is
    from difflab.data.order import ResumableLoader
    from difflab.data.shards import ShardsDataModule

    dm = ShardsDataModule(path=path, resolution=32, batch_size=64, in_memory=False, val_fraction=0)
    dm.setup()
    sampler = ShuffledEpochs(dm.train_source, 0, num_replicas=world, rank=rank)
    loader = ResumableLoader(dm.train_source, 64 // world, sampler, collate_fn=batch_as_is)
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += batch[0].shape[0]
    queue.put((n, time.perf_counter() - start))


def shards(args: argparse.Namespace) -> None:
    import multiprocessing as mp
    import warnings

    from difflab.data import ImageFolderDataModule
    from difflab.data.synthetic import write_folder
    from difflab.data.write_shards import write_shards

    warnings.simplefilter("ignore")
    work = Path(args.work)
    folder, out = work / f"flat32_{args.n}", work / f"written32_{args.n}"
    if not folder.is_dir():
        write_folder(folder, args.n, 32, classes=0, captions=False)
    if out.is_dir():
        subprocess.run(["rm", "-r", str(out)], check=True)
    start = time.perf_counter()
    write_shards(ImageFolderDataModule(path=str(folder), resolution=32, num_workers=2), out, num_workers=2)
    print(f"write: {args.n / (time.perf_counter() - start):,.0f} images/s ({args.n:,} 32x32 PNGs, 2 decode workers)")
    for world in (1, 2):
        queue = mp.get_context("fork").Queue()
        procs = [mp.get_context("fork").Process(target=_read_rank, args=(str(out), r, world, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        total = sum(n for n, _ in results) / max(t for _, t in results)
        print(f"read, {world} process(es), no workers: {total:,.0f} images/s over one epoch "
              f"({json.dumps([n for n, _ in results])} images per process)")


def headers(args: argparse.Namespace) -> None:
    """Microseconds per file of the pre-training header check: difflab's PNG IHDR read against PIL.Image.open,
    alternating over --rounds passes of --n 64x64 PNGs (the first pass of each warms the file cache)."""
    from PIL import Image

    from difflab.data.image_folder import png_size
    from difflab.data.synthetic import write_folder

    folder = Path(args.work) / f"folder64_{args.n}"
    if not folder.is_dir():
        write_folder(folder, args.n, 64, classes=10, captions=True)
    files = sorted(folder.rglob("*.png"))

    def pil_size(path: Path) -> tuple[int, int]:
        with Image.open(path) as img:
            return img.size

    times: dict[str, list[float]] = {"png_size": [], "PIL.Image.open": []}
    for _ in range(args.rounds + 1):
        for name, size in (("png_size", png_size), ("PIL.Image.open", pil_size)):
            start = time.perf_counter()
            sizes = [size(f) for f in files]
            times[name].append((time.perf_counter() - start) / len(files) * 1e6)
            assert sizes == [(64, 64)] * len(files)
    for name, ts in times.items():
        print(f"{name}: {statistics.median(ts[1:]):.1f} us/file (rounds {', '.join(f'{t:.1f}' for t in ts[1:])})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["loaders", "memory", "shards", "headers"])
    parser.add_argument("--work", default=str(WORK))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--n", type=int, default=5000, help="images per synthetic set (loaders, shards)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    {"loaders": loaders, "memory": memory, "shards": shards, "headers": headers}[args.what](args)


if __name__ == "__main__":
    main()
