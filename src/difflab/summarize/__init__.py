"""python -m difflab.summarize SWEEP_DIR: one table and one plot of an evaluation sweep's results; of a training
sweep (``python train.py -m ...``), the report of :mod:`difflab.summarize.training`.

Reads every job's ``results.json`` and ``.hydra/overrides.yaml`` under a Hydra multirun dir
(``python evaluate.py -m ...``), writes ``summary.md``, ``summary.csv`` and ``summary.png``
(FID, KID and seconds per image against the number of sampler steps, one line per remaining
combination, e.g. sampler x guidance scale) into that dir, and prints the markdown table. A job without
``results.json`` (failed, or still running) is reported and left out.

Results JSON schema (``<run dir>/results.json``, written by evaluate.py; ``schema`` = 1)::

    {
      "schema": 1,
      "ckpt": "outputs/train/2026-11-22_04-56-39/checkpoints/last.ckpt",  # the checkpoint file evaluated
      "sampler": {"name": "ddim", "num_steps": 50, "spacing": "trailing", "eta": 0.0},
                        # name: the sampler config option; the rest: its resolved settings (no _target_)
      "num_steps": 50,  # sampler steps actually walked per image (T = 1000 for sampler=ddpm)
      "guidance_scale": 1.0,
      "num_samples": 1000,
      "seed": 0,
      "features": {"name": "classifier", "fingerprint": "ClassifierFeatures/v1 ..."},  # null without fid/kid
      "metrics": {"fid": 2.31, "kid_mean": 0.0012, "kid_std": 0.0003, "kid_subset_size": 1000, "nll_bpd": 1.87},
                        # the metrics asked for (metrics=[fid,kid,nll]); kid gives kid_mean, kid_std, kid_subset_size;
                        # fid / kid of a text model on classed data add prompt_accuracy (in [0, 1])
      "seconds": 41.2,  # wall-clock seconds spent sampling the num_samples images (not features or NLL)
      "seconds_per_image": 0.0412
    }

Other keys are allowed and ignored here.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

RESULTS_FILE = "results.json"
METRIC_ORDER = ("fid", "kid_mean", "kid_std", "nll_bpd")
"""Metrics in this order first, any others after them by name."""
CORE = ("sampler", "num_steps", "guidance_scale")
"""Columns every row has, from the results; overrides that set them (sampler.num_steps, ...) are not repeated."""
COVERED_OVERRIDES = ("sampler", "sampler.num_steps", "guidance_scale")
PLOTTED = ("fid", "kid_mean", "seconds_per_image")
"""The panels of summary.png, those present (nll_bpd does not depend on the sampler: it is in the table only)."""


def read_overrides(job_dir: Path) -> dict[str, str]:
    """A job's Hydra overrides ``key=value`` (``+`` / ``++`` prefixes dropped); {} if it has none."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    pairs = {}
    for item in OmegaConf.load(path):
        key, _, value = str(item).partition("=")
        pairs[key.lstrip("+")] = value
    return pairs


def collect(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """(rows, jobs without results): a row per job with results.json, named by its dir relative to ``sweep_dir``."""
    job_dirs = {p.parent.parent for p in sweep_dir.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    job_dirs |= {p.parent for p in sweep_dir.rglob(RESULTS_FILE)}
    rows, missing = [], []
    for job in sorted(job_dirs, key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(sweep_dir).parts]):
        results_path = job / RESULTS_FILE
        if not results_path.is_file():
            missing.append(job)
            continue
        results = json.loads(results_path.read_text())
        rows.append({
            "job": str(job.relative_to(sweep_dir)) or ".",
            "overrides": read_overrides(job),
            "sampler": results["sampler"]["name"],
            "num_steps": results["num_steps"],
            "guidance_scale": results.get("guidance_scale"),
            "metrics": results.get("metrics", {}),
            "seconds": results.get("seconds"),
            "seconds_per_image": results.get("seconds_per_image"),
        })
    return rows, missing


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(header, body): job, the overrides that vary between jobs, sampler, num_steps, guidance_scale, metrics, times."""
    keys = sorted({k for r in rows for k in r["overrides"]} - set(COVERED_OVERRIDES))
    varying = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]
    names = {m for r in rows for m in r["metrics"]}
    metrics = [m for m in METRIC_ORDER if m in names] + sorted(names - set(METRIC_ORDER))
    header = ["job", *varying, *CORE, *metrics, "seconds", "seconds_per_image"]
    rows = sorted(rows, key=lambda r: (_group(r, varying), r["num_steps"]))
    body = [
        [r["job"], *(r["overrides"].get(k) for k in varying), *(r[c] for c in CORE),
         *(r["metrics"].get(m) for m in metrics), r["seconds"], r["seconds_per_image"]]
        for r in rows
    ]
    return header, body


def _group(row: dict[str, Any], varying: Sequence[str]) -> str:
    """The row's line in the plot: everything that identifies it except the number of steps."""
    parts = [f"sampler={row['sampler']}", f"guidance_scale={row['guidance_scale']}"]
    return " ".join(parts + [f"{k}={row['overrides'].get(k)}" for k in varying])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def markdown(header: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], header: list[str], path: Path) -> Path | None:
    """Each of PLOTTED that the table has against num_steps, a line per group (log-log); None if none."""
    from matplotlib.figure import Figure  # the object API renders with Agg, no display or pyplot state

    metrics = [m for m in PLOTTED if m in header]
    if not metrics:
        return None
    varying = header[1 : header.index("sampler")]
    fig = Figure(figsize=(5 * len(metrics), 4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_group(row, varying), []).append(row)
    for ax, metric in zip(axes, metrics):
        for label, members in sorted(groups.items()):
            values = [(r["num_steps"], r["metrics"].get(metric, r.get(metric))) for r in members]
            points = sorted((steps, value) for steps, value in values if value is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xscale("log")
        if metric == "seconds_per_image":
            ax.set_yscale("log")
        ax.set_xlabel("sampler steps")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path


def summarize(sweep_dir: str | Path) -> dict[str, Any]:
    """Write summary.md, summary.csv and summary.png into ``sweep_dir`` (a training sweep: its report, see
    :func:`~difflab.summarize.training.summarize_training`); returns paths, header, body, the jobs missing
    the ``expected`` file."""
    from difflab.summarize.training import summarize_training, training_jobs

    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory: give the multirun dir of a sweep (evaluate or train)")
    if training_jobs(sweep_dir):
        return summarize_training(sweep_dir)
    rows, missing = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {sweep_dir}: is it the dir of an evaluate.py -m sweep?")
    header, body = table(rows)
    md = sweep_dir / "summary.md"
    md.write_text(markdown(header, body))
    csv_path = sweep_dir / "summary.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([header, *[["" if v is None else v for v in row] for row in body]])
    png = plot(rows, header, sweep_dir / "summary.png")
    return {"markdown": md, "csv": csv_path, "plot": png, "plots": [png] if png else [], "header": header, "body": body,
            "missing": missing, "expected": RESULTS_FILE}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m difflab.summarize", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="the multirun dir of a sweep (multirun/evaluate/<id>, multirun/train/<id>)")
    args = parser.parse_args(argv)
    try:
        out = summarize(args.sweep_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for job in out["missing"]:
        print(f"left out:    {job} has no {out['expected']} (failed, or still running)", file=sys.stderr)
    print(out["markdown"].read_text(), end="")
    written = [out["markdown"], out["csv"], *out["plots"]]
    print("\n".join(f"wrote:       {p}" for p in written))
    return 0
