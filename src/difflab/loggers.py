"""Loggers whose records follow the run dir: a resumed or requeued run continues its CSV file and its W&B run."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

RUN_ID_FILE = "wandb_run_id"


class ContinuingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not deleted.

    Lightning 2.6 deletes the file when its log dir is not empty, so resuming a run dir wiped the
    metrics of every step before the interruption. Here the file's header becomes the known
    columns and new rows are appended (a new column rewrites the file with the old rows kept).
    """

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class RunDirCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing through :class:`ContinuingExperimentWriter`: a resumed run appends its rows."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


class RunDirWandbLogger(WandbLogger):
    """Lightning's WandbLogger that finishes its run with the fit, also a failed one.

    Without this a Hydra sweep running its jobs in one process logs job 2 into job 1's still-open run.
    """

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)


def wandb_logger(
    save_dir: str | os.PathLike,
    project: str = "difflab",
    entity: str | None = None,
    group: str | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
    log_model: bool | str = False,
    **kwargs: Any,
) -> RunDirWandbLogger:
    """A W&B logger writing under ``save_dir`` (the run dir), with the run id kept in ``<save_dir>/wandb_run_id``.

    ``name`` defaults to the run dir's name (``tasks`` passes ``<sweep>/<job>`` and the sweep as
    ``group`` for the jobs of a sweep). ``log_model``: upload checkpoints (True: at the end, "all": each).
    """
    from wandb.sdk.lib.runid import generate_id

    run_dir = Path(save_dir)
    id_file = run_dir / RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = generate_id()
        if rank_zero_only.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
    # Under ddp_spawn the rank-0 worker attaches to the run the launcher created; without this it
    # would write the run's media into ./wandb of the working directory instead of the run dir.
    os.environ["WANDB_DIR"] = str(run_dir.absolute())
    return RunDirWandbLogger(
        save_dir=str(run_dir), id=run_id, resume="allow", project=project, entity=entity, group=group,
        name=name or run_dir.name, tags=list(tags or []), log_model=log_model, **kwargs,
    )
