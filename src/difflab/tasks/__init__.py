"""The bodies of the entry points, as plain functions tests call: one module each.

| module | entry point |
|---|---|
| :mod:`~difflab.tasks.train` | train.py, train_classifier.py, train_vae.py |
| :mod:`~difflab.tasks.sample` | sample.py |
| :mod:`~difflab.tasks.evaluate` | evaluate.py (one checkpoint) |
| :mod:`~difflab.tasks.watch` | evaluate.py watch=RUN (every checkpoint of a run, beside its training) |
| :mod:`~difflab.tasks.export` | export.py |
| :mod:`~difflab.tasks.posthoc_ema` | python -m difflab.posthoc_ema |
| :mod:`~difflab.tasks.noise_report` | python -m difflab.noise_report |

with the shared :mod:`~difflab.tasks.checks` (settings refused before anything is written),
:mod:`~difflab.tasks.resume` (where a fit starts), :mod:`~difflab.tasks.sweep` (completion markers, dry runs),
:mod:`~difflab.tasks.report` (what a job reports) and :mod:`~difflab.tasks.common`. Objects are built by
:mod:`difflab.build`.
"""

from difflab.tasks.evaluate import evaluate
from difflab.tasks.export import export
from difflab.tasks.report import run_job
from difflab.tasks.sample import sample
from difflab.tasks.train import train, train_classifier, train_vae

__all__ = ["evaluate", "export", "run_job", "sample", "train", "train_classifier", "train_vae"]
