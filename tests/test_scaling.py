"""Scale and operations, on CPU: 2-process DDP (gloo) from train.py, W&B offline, sweeps, submitit, preemption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from PIL import Image

from difflab.build import instantiate_node, load_checkpoint
from difflab.distributed import device_batch_size, launch_settings, tensor_digest
from difflab.errors import ConfigError
from difflab.images import save_grid, to_uint8
from tests.conftest import ROOT, TINY_TRAIN, compose, run_script

DDP = [*TINY_TRAIN, "trainer=ddp_cpu"]


def _dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))


@pytest.mark.slow
def test_ddp_fit_from_train_py(tmp_path):
    """2 processes: one run dir, every rank holds the checkpoint's EMA, one grid equal to a 1-process draw."""
    run_dir = tmp_path / "run"
    proc = run_script("train.py", *DDP, f"hydra.run.dir={run_dir}")
    assert "deprecated" not in (proc.stdout + proc.stderr).lower()  # the spawned ranks' consoles are quiet too
    assert _dirs(tmp_path) == ["run"]
    report = json.loads((run_dir / "ddp_consistency.json").read_text())
    assert report["world_size"] == 2 and report["global_step"] == 6
    module = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert {r["ema_sha256"] for r in report["ranks"]} == {tensor_digest(module.ema.module.parameters())}
    assert {r["weights_sha256"] for r in report["ranks"]} == {tensor_digest(module.net.parameters())}
    assert module.ema.num_updates == 6
    # the grid the two ranks drew in halves is the grid one process draws from the same EMA weights
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_000003.png", "step_000006.png"]
    grid_sampler = instantiate_node(compose("train", [*DDP, "output_dir=/unused"]).sampler, "sampler")
    images = to_uint8(module.generate(grid_sampler, 4, seed=0))  # the run's grid sampler (dpmpp_2m, 5 steps)
    expected = np.asarray(Image.open(save_grid(images, tmp_path / "one_process.png", scale=4)))
    np.testing.assert_array_equal(np.asarray(Image.open(run_dir / "samples" / "step_000006.png")), expected)


@pytest.mark.slow
def test_ddp_under_multirun_gives_one_dir_per_job(tmp_path):
    """Also: shaped noise is fitted on rank 0 and broadcast, so every rank holds the same statistics."""
    sweep = tmp_path / "sweep"
    run_script("train.py", "-m", *DDP, "trainer.max_steps=3", "seed=0,1", "noise=spectral", f"hydra.sweep.dir={sweep}",
               cwd=tmp_path)
    assert _dirs(sweep) == ["0", "1"]
    assert _dirs(tmp_path) == ["sweep"]  # no second multirun tree, no stray outputs/
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file() and (sweep / job / "noise.safetensors").is_file()
        ranks = json.loads((sweep / job / "ddp_consistency.json").read_text())["ranks"]
        assert len({r["noise_sha256"] for r in ranks}) == 1


@pytest.mark.slow
def test_torchrun_launch_uses_the_ranks_it_started(tmp_path):
    """Ranks started outside Lightning (torchrun; SLURM tasks likewise) train as one run in one dir."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *DDP, "run_id=tr"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "train" / "tr"
    assert _dirs(tmp_path / "outputs" / "train") == ["tr"]
    report = json.loads((run_dir / "ddp_consistency.json").read_text())
    assert report["world_size"] == 2 and len({r["ema_sha256"] for r in report["ranks"]}) == 1


def test_launch_path_per_situation(monkeypatch):
    for var in ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "SLURM_JOB_NAME",
                "TORCHELASTIC_RUN_ID", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert launch_settings("auto") == {}
    assert launch_settings("ddp") == {"strategy": "ddp_spawn"}  # python train.py [-m]
    monkeypatch.setenv("SLURM_NTASKS", "8")  # 2 nodes x 4 tasks, as submitit starts them
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    slurm = launch_settings("ddp")  # one SLURM task per GPU
    assert slurm["strategy"] == "ddp" and isinstance(slurm["plugins"][0], SLURMEnvironment)
    assert (slurm["devices"], slurm["num_nodes"]) == (4, 2)
    assert slurm["plugins"][0].auto_requeue is False  # difflab's Preemption callback requeues
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")
    single = launch_settings("ddp")  # one task driving several GPUs
    assert single["strategy"] == "ddp_spawn" and isinstance(single["plugins"][0], LightningEnvironment)


def test_global_batch_is_split_or_refused(tmp_path):
    assert device_batch_size(64, 4, 2) == 8
    with pytest.raises(ConfigError, match=r"batch_size=30 .* world_size=4 x trainer.accumulate_grad_batches=1 = 4"):
        device_batch_size(30, 4)
    proc = run_script("train.py", *DDP, "dataset.batch_size=33", f"hydra.run.dir={tmp_path / 'r'}", check=False)
    assert proc.returncode != 0 and "dataset.batch_size=33" in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def _wandb_summary(run_dir: Path) -> list[dict]:
    exe = Path(sys.executable).with_name("wandb")
    out = []
    for offline in sorted((run_dir / "wandb").glob("offline-run-*")):
        proc = subprocess.run([str(exe), "leet", "inspect", "--summary", "--json", str(offline)],
                              capture_output=True, text=True, check=True)
        out.append(json.loads(proc.stdout))
    return out


@pytest.mark.slow
def test_optuna_sweep_reports_its_metric(tmp_path):
    db = tmp_path / "study.db"
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage=sqlite:///{db}",
            *TINY_TRAIN, "trainer.max_steps=3", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    run_script("train.py", *args, cwd=tmp_path)
    result = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_value" in result
    import optuna

    study = optuna.load_study(study_name="difflab_train", storage=f"sqlite:///{db}")
    values = [t.value for t in study.trials]
    assert len(values) == 3 and all(0 < v < 2 for v in values)
    # the same command continues the stored study
    run_script("train.py", *args[:1], "hydra.sweeper.n_trials=1", *args[2:], cwd=tmp_path)
    assert len(optuna.load_study(study_name="difflab_train", storage=f"sqlite:///{db}").trials) == 4


@pytest.mark.slow
def test_a_failing_job_does_not_take_down_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", *TINY_TRAIN, "trainer.max_steps=3", "schedule.beta_end=2.0,0.02",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "beta" in proc.stderr
    assert not (sweep / "0" / "checkpoints").exists()
    assert "job failed: ConfigError" in (sweep / "0" / "train.log").read_text()  # recorded in the job's dir
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_job(tmp_path):
    sweep = tmp_path / "sweep"
    run_script("train.py", "-m", "hydra/launcher=local", *TINY_TRAIN, "trainer.max_steps=3",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file()
    assert torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_slurm_launcher_config_gives_one_task_per_gpu():
    cfg = compose("train", ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8", "trainer=ddp",
                            "trainer.num_nodes=2", "hydra.launcher.nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 8 and launcher.nodes == 2 and launcher.signal_delay_s == 120
    assert cfg.trainer.strategy == "ddp" and cfg.callbacks.preemption.requeue_signals == ["SIGUSR2"]


def _preempt(args: list[str], cwd: Path, ckpts: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Start train.py, send SIGUSR2 (the configured signal) once it has written step 2; (steps done, stdout)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (ckpts / "step_000002.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR2)  # to the launching process: under ddp_spawn it forwards to the ranks
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"], out


PREEMPTIBLE = [*TINY_TRAIN, "trainer.max_steps=24", "callbacks.model_checkpoint.every_n_train_steps=2",
               "callbacks.sample_grid.every_n_steps=100"]


@pytest.mark.slow
def test_preemption_saves_and_the_same_command_resumes(tmp_path):
    """As a SLURM job (SLURM_JOB_ID set, `scontrol` on PATH records its call): save, requeue, resume."""
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    scontrol.chmod(0o755)
    env = {**os.environ, "SLURM_JOB_ID": "4242", "PATH": f"{scontrol.parent}:{os.environ['PATH']}"}
    args = [*PREEMPTIBLE, "run_id=pre"]
    ckpts = tmp_path / "outputs" / "train" / "pre" / "checkpoints"
    stopped, out = _preempt(args, tmp_path, ckpts, env)
    assert 2 <= stopped < 24 and f"preempted by SIGUSR2 at step {stopped}" in out
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert "requeued SLURM job 4242" in out
    resumed = run_script("train.py", *args, cwd=tmp_path)
    assert "resuming:    outputs/train/pre/checkpoints/last.ckpt" in resumed.stdout
    assert resumed.stdout.count("Restored all states") == 1  # Lightning's line, once, through Hydra's console
    assert _dirs(tmp_path / "outputs" / "train") == ["pre"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 24


@pytest.mark.slow
def test_wandb_under_ddp_logs_and_a_preempted_run_continues_it(tmp_path):
    """W&B offline on 2 processes: keys and the grid read back; preempted + same command = the same W&B run."""
    args = [*PREEMPTIBLE, "trainer.max_steps=16", "trainer=ddp_cpu", "logger=wandb", "logger.wandb.tags=[ci]",
            "run_id=pre_ddp"]
    run_dir = tmp_path / "outputs" / "train" / "pre_ddp"
    stopped, _ = _preempt(args, tmp_path, run_dir / "checkpoints")
    assert 2 <= stopped < 16
    run_script("train.py", *args, cwd=tmp_path)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 16
    assert json.loads((run_dir / "ddp_consistency.json").read_text())["global_step"] == 16
    runs = _wandb_summary(run_dir)
    assert len(runs) == 2 and {r["run_id"] for r in runs} == {(run_dir / "wandb_run_id").read_text().strip()}
    assert all(r["state"] == "finished" and r["tags"] == ["ci"] for r in runs)
    first, last = runs
    assert first["summary"]["trainer/global_step"] <= stopped < last["summary"]["trainer/global_step"]
    for key in ("train/loss", "train/lr", "train/ema_decay", "train/images_per_sec", "val/loss", "val/loss_ema"):
        assert np.isfinite(last["summary"][key]), key
    grid = last["summary"]["samples"]
    assert grid["_type"] == "images/separated"
    image = run_dir / "wandb" / Path(last["file"]).parent.name / "files" / grid["filenames"][0]
    assert Image.open(image).size == (grid["width"], grid["height"])
    assert last["config"]["run_config"]["optimizer"]["lr"] == pytest.approx(1e-3)
    assert _dirs(tmp_path) == ["outputs"]  # nothing in the working directory (no stray ./wandb)


def test_existing_run_dir_is_resumed_with_another_speed_knob(trained_run, tmp_path):
    """A run dir with checkpoints is resumed by the same command, also with another speed knob.

    Its refusals (resume=never, another experiment in the same dir) are rows of tests/test_bad_inputs.py.
    """
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    proc = run_script("train.py", *TINY_TRAIN, "model.channels_last=true", "trainer.max_steps=9", f"hydra.run.dir={run_dir}")
    assert "resuming:" in proc.stdout
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
