"""Synthetic datasets for recipes, tests and benchmarks, in the formats the ``dataset`` options read.

    python -m difflab.data.synthetic out=DIR n=1000 resolution=32 [classes=10] [format=folder] [captions=false]

``format=folder`` writes PNGs (one sub-folder per class, or flat with ``classes=0``) and, with
``captions=true``, a ``metadata.jsonl`` of file names, labels and captions (a Hugging Face ``imagefolder``);
``format=cifar10`` / ``cifar100`` writes the python-version batch files of CIFAR (32x32 only) under
``DIR/cifar-10-batches-py`` / ``DIR/cifar-100-python``. Image k of class c is a smooth colour field
with class-c hue plus noise, drawn from (seed, k): the same arguments write the same files.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from difflab.data.cifar import ARCHIVES, FILES, LABELS, META

COLOURS = ["red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "brown", "grey"]


def synthetic_pixels(n: int, resolution: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, resolution, resolution, 3) uint8 and labels (n,): class hue + a random smooth gradient + noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % max(classes, 1)
    hue = np.stack([np.sin(2 * np.pi * (labels / max(classes, 1) + k / 3)) for k in range(3)], axis=1)  # (n, 3)
    ramp = np.linspace(-1, 1, resolution, dtype=np.float32)
    slope = rng.normal(0, 0.5, (n, 2, 1, 1, 1)).astype(np.float32)
    field = slope[:, 0] * ramp[None, :, None, None] + slope[:, 1] * ramp[None, None, :, None]  # (n, H, W, 1)
    x = 0.5 + 0.3 * hue[:, None, None, :] + 0.2 * field + rng.normal(0, 0.05, (n, resolution, resolution, 3))
    return (np.clip(x, 0, 1) * 255).astype(np.uint8), labels


def write_folder(out: Path, n: int, resolution: int, classes: int, captions: bool, seed: int = 0) -> None:
    """PNGs under ``out`` (class sub-folders unless classes=0), plus metadata.jsonl when ``captions``."""
    rows = []
    for start in range(0, n, 1000):  # chunks: 100,000 64x64 images never sit in memory at once
        pixels, labels = synthetic_pixels(min(1000, n - start), resolution, classes, seed + start)
        for k, (x, y) in enumerate(zip(pixels, labels)):
            name = f"{start + k:07d}.png" if classes == 0 else f"{COLOURS[y % 10]}{y // 10 or ''}/{start + k:07d}.png"
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(out / name, compress_level=1)
            rows.append({"file_name": name, "label": int(y), "text": f"a {COLOURS[y % 10]} square"})
    if captions:
        (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_cifar(out: Path, n: int, variant: str, classes: int, seed: int = 0) -> Path:
    """CIFAR python-version files of ``n`` synthetic 32x32 images per split, pickled as the originals are."""
    folder = out / ARCHIVES[variant][0]
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{COLOURS[k % 10]}{k // 10 or ''}".encode() for k in range(classes)]
    meta = {META[variant][1]: names}
    if variant == "cifar100":
        meta[b"coarse_label_names"] = names[: max(1, classes // 5)]
    _dump(folder / META[variant][0], meta)
    for s, split in enumerate(("train", "test")):
        files = FILES[(variant, split)]
        pixels, labels = synthetic_pixels(n, 32, classes, seed + s)
        for part, idx in zip(files, np.array_split(np.arange(n), len(files))):
            data = pixels[idx].transpose(0, 3, 1, 2).reshape(len(idx), 3072)  # R, G, B planes per row
            batch = {b"batch_label": part.encode(), LABELS[variant]: labels[idx].tolist(), b"data": data,
                     b"filenames": [f"{i:07d}.png".encode() for i in idx]}
            if variant == "cifar100":
                batch[b"coarse_labels"] = (labels[idx] // 5).tolist()
            _dump(folder / part, batch)
    return folder


def _dump(path: Path, obj: dict) -> None:
    """Pickle protocol 2 naming numpy's module as the original Python 2 files do (numpy.core.multiarray)."""
    path.write_bytes(pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    allowed = {"out", "n", "resolution", "classes", "format", "captions", "seed"}
    if "out" not in args or set(args) - allowed:
        sys.exit(f"usage: python -m difflab.data.synthetic out=DIR [n=1000] [resolution=32] [classes=10] "
                 f"[format=folder|cifar10|cifar100] [captions=false] [seed=0]; got {' '.join(argv)}")
    out, fmt = Path(args["out"]), args.get("format", "folder")
    n, resolution, seed = int(args.get("n", 1000)), int(args.get("resolution", 32)), int(args.get("seed", 0))
    classes = int(args.get("classes", 100 if fmt == "cifar100" else 10))
    if fmt == "folder":
        write_folder(out, n, resolution, classes, args.get("captions", "false") == "true", seed)
    elif fmt in ARCHIVES and resolution == 32:
        out = write_cifar(out, n, fmt, classes, seed)
    else:
        sys.exit(f"format={fmt} resolution={resolution}: format is folder, cifar10 or cifar100 (the last two: 32)")
    print(f"wrote {n} synthetic images to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
