"""The report of a training sweep (``python train.py -m ...``), for ``python -m difflab.summarize SWEEP_DIR``.

Per job (a dir with ``.hydra/config.yaml`` of task ``train``): its overrides, the curves of ``logs/metrics.csv``
(and of the watcher's ``eval/step_*.json``) against images seen and training time, and its final metrics (the
last logged value of each; a ``done.json`` in the job dir overrides them with its numeric values). Jobs whose
overrides differ only in ``seed`` form a group: per final metric the mean over its seeds and the half-width of
a 95% Student-t interval, ``t(0.975, n - 1) * s / sqrt(n)`` (s: the sample standard deviation; none for n = 1).

Images seen after the metrics.csv row of ``step`` (0-based: Lightning logs the index of the step just taken)
are ``(step + 1) * dataset.batch_size`` (the global batch of one optimizer step). Training time is not in
metrics.csv: it is integrated from ``train/images_per_sec``, ``batch_size / images_per_sec`` per step (a row
logged every k steps stands for the k steps since the previous one), so it is the time of the training steps
alone, without validation, sample grids, checkpoints or start-up.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

METRICS_CSV = Path("logs") / "metrics.csv"
LOSSES = ("val/loss", "val/loss_ema")
"""Final metrics every job reports when logged; eval/* metrics (in-training or watcher) follow them by name."""
NOT_REPORTED = {"eval/kid_subset_size"}
DONE_FILE = "done.json"
"""The marker a training job writes into its run dir when it reached trainer.max_steps (difflab.tasks.sweep)."""


@dataclass
class Job:
    """One training job of the sweep: where it is, what it overrides, its curves and final values."""

    name: str
    overrides: dict[str, str]
    curves: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    """metric -> [(images seen, training seconds, value)] by step."""
    final: dict[str, float] = field(default_factory=dict)

    @property
    def group(self) -> tuple[tuple[str, str], ...]:
        """The overrides except ``seed``: jobs with the same group are seeds of one setting."""
        return tuple(sorted((k, v) for k, v in self.overrides.items() if k != "seed"))


def training_jobs(sweep_dir: Path) -> list[Path]:
    """The job dirs under ``sweep_dir`` whose Hydra config is of task ``train``, in job-number order."""
    jobs = [p.parent.parent for p in sweep_dir.rglob("config.yaml") if p.parent.name == ".hydra"]
    jobs = [j for j in jobs if OmegaConf.load(j / ".hydra" / "config.yaml").get("task_name") == "train"]
    return sorted(jobs, key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(sweep_dir).parts])


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value


def training_clock(rows: list[dict[str, str]], batch_size: int) -> tuple[list[int], list[float]]:
    """(steps, training seconds after each): integrated from the ``train/images_per_sec`` rows."""
    steps, seconds, previous, total = [], [], -1, 0.0
    for row in rows:
        rate, step = _number(row.get("train/images_per_sec")), int(float(row["step"]))
        if rate and rate > 0 and step > previous:
            total += (step - previous) * batch_size / rate
            previous = step
            steps.append(step)
            seconds.append(total)
    return steps, seconds


def read_job(sweep_dir: Path, job_dir: Path) -> Job | None:
    """The job's curves and final metrics; None if it has no ``logs/metrics.csv`` (failed early, or not started)."""
    from difflab.summarize import read_overrides

    path = job_dir / METRICS_CSV
    if not path.is_file():
        return None
    batch_size = int(OmegaConf.load(job_dir / ".hydra" / "config.yaml").dataset.batch_size)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    clock_steps, clock = training_clock(rows, batch_size)

    def seconds_at(step: int) -> float:
        i = bisect.bisect_right(clock_steps, step) - 1
        return clock[i] if i >= 0 else 0.0

    job = Job(str(job_dir.relative_to(sweep_dir)), read_overrides(job_dir))
    points: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, text in row.items():
            value = _number(text)
            if (key in LOSSES or key.startswith("eval/")) and value is not None:
                points.setdefault(key, {})[int(float(row["step"]))] = value
    for scores in sorted((job_dir / "eval").glob("step_*.json")):  # evaluate.py watch=: at global step N = index N-1
        for name, value in json.loads(scores.read_text()).get("metrics", {}).items():
            points.setdefault(f"eval/{name}", {})[int(scores.stem[5:]) - 1] = float(value)
    for key, by_step in points.items():
        if key in NOT_REPORTED:
            continue
        job.curves[key] = [((s + 1) * batch_size, seconds_at(s), v) for s, v in sorted(by_step.items())]
        job.final[key] = job.curves[key][-1][2]
    done = job_dir / DONE_FILE
    if done.is_file():
        record = json.loads(done.read_text())
        values = record.get("metrics", record) if isinstance(record, dict) else {}
        job.final |= {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    last = max((s for s in (int(float(r["step"])) for r in rows)), default=-1)
    job.final |= {"images_seen": (last + 1) * batch_size, "train_seconds": seconds_at(last)}
    return job


def mean_interval(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95% Student-t interval); the half-width is None for a single value."""
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(t.ppf(0.975, n - 1)) * s / math.sqrt(n)


def metric_order(jobs: list[Job]) -> list[str]:
    """The final metrics of any job: the losses, then eval/* and done.json's by name, then images seen and time."""
    names = {m for j in jobs for m in j.final}
    head = [m for m in LOSSES if m in names]
    tail = [m for m in ("images_seen", "train_seconds") if m in names]
    return head + sorted(names - set(head) - set(tail)) + tail


def differing_overrides(jobs: list[Job]) -> list[str]:
    """The override keys, other than seed, whose values differ between jobs (those that tell groups apart)."""
    keys = sorted({k for j in jobs for k in j.overrides} - {"seed"})
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def label(job: Job, differing: list[str]) -> str:
    """The job's group as its differing overrides, ``schedule=cosine lr=0.001``; ``all`` if nothing differs."""
    return " ".join(f"{k}={job.overrides.get(k)}" for k in differing) or "all"


def group_table(jobs: list[Job], differing: list[str]) -> tuple[list[str], list[list[Any]]]:
    """(header, body): a row per group, its differing overrides, seeds, and per final metric mean and interval."""
    groups: dict[tuple[tuple[str, str], ...], list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    metrics = metric_order(jobs)
    header = ["group", *differing, "n", "seeds"] + [f"{m}_{s}" for m in metrics for s in ("mean", "ci95")]
    body = []
    for members in groups.values():
        row: list[Any] = [label(members[0], differing), *(members[0].overrides.get(k) for k in differing), len(members),
                          " ".join(str(j.overrides.get("seed", "")) for j in members)]
        for metric in metrics:
            values = [j.final[metric] for j in members if metric in j.final]
            row += list(mean_interval(values)) if values else [None, None]
        body.append(row)
    return header, body


def plot_curves(jobs: list[Job], differing: list[str], x: int, xlabel: str, path: Path) -> Path | None:
    """Each curve metric (val/loss_ema, val/loss, eval/fid, ...) against images seen (x=0) or seconds (x=1)."""
    from matplotlib.figure import Figure

    metrics = [m for m in metric_order(jobs) if any(len(j.curves.get(m, ())) for j in jobs)]
    if not metrics:
        return None
    fig = Figure(figsize=(5 * len(metrics), 4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colours = {g: f"C{i % 10}" for i, g in enumerate(dict.fromkeys(j.group for j in jobs))}
    for ax, metric in zip(axes, metrics):
        labelled = set()
        for job in jobs:
            points = job.curves.get(metric)
            if points:
                name = None if job.group in labelled else label(job, differing)
                labelled.add(job.group)
                ax.plot([p[x] for p in points], [p[2] for p in points], color=colours[job.group], label=name,
                        marker=".", alpha=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small", title="one line per seed")
    fig.savefig(path, dpi=100)
    return path


def summarize_training(sweep_dir: Path) -> dict[str, Any]:
    """Write summary.md, summary.csv, curves_images.png and curves_time.png of a training sweep into ``sweep_dir``."""
    from difflab.summarize import markdown

    jobs, missing = [], []
    for job_dir in training_jobs(sweep_dir):
        job = read_job(sweep_dir, job_dir)
        if job is None:
            missing.append(job_dir)
        else:
            jobs.append(job)
    if not jobs:
        raise FileNotFoundError(f"no job of {sweep_dir} has {METRICS_CSV}: did its jobs fail before logging?")
    differing = differing_overrides(jobs)
    header, body = group_table(jobs, differing)
    metrics = metric_order(jobs)
    per_job = [[j.name, label(j, differing), j.overrides.get("seed"), *(j.final.get(m) for m in metrics)] for j in jobs]
    values = [[k, ", ".join(dict.fromkeys(str(j.overrides.get(k)) for j in jobs))] for k in differing]
    md = sweep_dir / "summary.md"
    md.write_text(
        f"# Training sweep {sweep_dir.name}\n\n## Overrides that differ between groups\n\n"
        + markdown(["override", "values"], values)
        + "\n## Groups (mean over seeds, ci95: half-width of the 95% Student-t interval)\n\n"
        + markdown(header, body)
        + "\n## Jobs (final values)\n\n" + markdown(["job", "group", "seed", *metrics], per_job)
    )
    csv_path = sweep_dir / "summary.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([header, *[["" if v is None else v for v in row] for row in body]])
    plots = [plot_curves(jobs, differing, 0, "images seen", sweep_dir / "curves_images.png"),
             plot_curves(jobs, differing, 1, "training seconds (steps only)", sweep_dir / "curves_time.png")]
    return {"markdown": md, "csv": csv_path, "plots": [p for p in plots if p], "header": header, "body": body,
            "missing": missing, "expected": str(METRICS_CSV)}
