"""A checkpoint from someone else never runs code through the run config it carries.

Each payload below is a checkpoint that passes ``torch.load(weights_only=True)`` (plain containers only) but
whose stored config names a callable that would leave a marker file if built. The test first shows each
payload is live (Hydra's ``instantiate`` on its node creates the marker), then runs sample, export, evaluate
and ``train ckpt_path=`` on it: each is refused naming the key and the target, and no marker appears.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from difflab.build.trust import BUILDABLE, check_stored_config
from difflab.errors import ConfigError
from tests.conftest import CONF, TINY_TRAIN, compose


class _Touch:
    """Unpickling this creates ``path``: a pickle that torch.load(weights_only=False) would execute."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.path}",)


def _payloads(marker: Path, pickle_file: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """{name: (the config key it sits at, the node)}: each node creates ``marker`` when instantiated."""
    torch.save(_Touch(str(marker)), pickle_file)
    return {
        "shutil.copyfile": ("model", {"_target_": "shutil.copyfile", "src": str(pickle_file), "dst": str(marker)}),
        "os.system": ("noise", {"_target_": "os.system", "_args_": [f"touch {marker}"]}),
        "builtins.exec": ("loss", {"_target_": "builtins.exec", "_args_": [f"open({str(marker)!r}, 'w').close()"]}),
        "torch.load": ("latent", {"_target_": "torch.load", "f": str(pickle_file), "weights_only": False}),
        "nested in a list": ("schedule", {"_target_": "difflab.schedule.NoiseSchedule.linear", "num_timesteps": 10,
                                          "extra": [1, {"_target_": "shutil.copyfile", "src": str(pickle_file),
                                                        "dst": str(marker)}]}),
    }


def _evil(trained_run: Path, tmp: Path, key: str, node: dict[str, Any]) -> Path:
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["run_config"][key] = node
    path = tmp / "evil.ckpt"
    torch.save(ckpt, path)
    torch.load(path, weights_only=True)  # passes the pickle check: plain containers only
    return path


PAYLOADS = ["shutil.copyfile", "os.system", "builtins.exec", "torch.load", "nested in a list"]
BLOCKED_BY_HYDRA = {"os.system", "builtins.exec"}
"""Hydra 1.3.8's own blocklist refuses these two; difflab refuses them first, and every callable it does not know."""


@pytest.mark.parametrize("name", PAYLOADS)
def test_every_payload_is_live_when_built_without_the_check(tmp_path, name):
    marker = tmp_path / "marker"
    _, node = _payloads(marker, tmp_path / "payload.pkl")[name]
    if name in BLOCKED_BY_HYDRA:
        with pytest.raises(Exception, match="blocklisted"):
            instantiate(copy.deepcopy(node))
        return
    try:
        instantiate(copy.deepcopy(node))
    except InstantiationException:  # the list's parent rejects its arguments, after the nested node ran
        assert name == "nested in a list"
    assert marker.exists(), f"{name}: the payload would not have run, so the test below proves nothing"


@pytest.mark.parametrize("command", ["sample", "export", "evaluate", "train"])
@pytest.mark.parametrize("name", PAYLOADS)
def test_a_checkpoint_whose_config_names_a_callable_is_refused_and_runs_nothing(trained_run, tmp_path, name, command):
    from difflab.tasks import evaluate, export, sample, train

    marker = tmp_path / "marker"
    key, node = _payloads(marker, tmp_path / "payload.pkl")[name]
    evil = _evil(trained_run, tmp_path, key, node)
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as refused:
        if command == "sample":
            sample(compose("sample", [f"ckpt={evil}", f"output_dir={out}", "progress=false"]))
        elif command == "export":
            export(compose("export", [f"ckpt={evil}", f"out={out}"]))
        elif command == "evaluate":
            evaluate(compose("evaluate", [f"ckpt={evil}", f"output_dir={out}", "metrics=[nll]"]))
        else:
            train(compose("train", [*TINY_TRAIN, f"ckpt_path={evil}", f"output_dir={out}"]))
    message = str(refused.value)
    target = "shutil.copyfile" if name == "nested in a list" else name
    assert f"{key}" in message and repr(target) in message and "nothing was built" in message, message
    assert not marker.exists()
    assert not out.exists() or not any(out.iterdir())


def test_an_interpolation_in_a_stored_config_is_refused():
    with pytest.raises(ConfigError, match=r"model.lr='\$\{oc.env:HOME\}'.*never an interpolation"):
        check_stored_config({"model": {"lr": "${oc.env:HOME}"}}, "x.ckpt")


def test_record_only_groups_are_dropped_and_difflab_s_own_targets_pass(trained_run):
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    stored = ckpt["hyper_parameters"]["run_config"]
    stored["callbacks"]["user"] = {"_target_": "my_package.MyCallback"}  # recorded, never built from a checkpoint
    kept = check_stored_config(stored, "last.ckpt")
    assert {"model", "schedule", "loss", "optimizer"} <= kept.keys()
    assert not {"trainer", "callbacks", "logger"} & kept.keys()


def _targets(node: Any) -> set[str]:
    if isinstance(node, dict):
        return {v for k, v in node.items() if k == "_target_"} | {t for v in node.values() for t in _targets(v)}
    if isinstance(node, list):
        return {t for v in node for t in _targets(v)}
    return set()


def test_the_allowlist_covers_every_option_a_checkpoint_rebuilds():
    import yaml

    groups = ["model", "schedule", "loss", "conditioning", "optimizer", "lr_scheduler", "noise", "latent", "dataset",
              "autoencoder"]
    found = {t for g in groups for f in (CONF / g).glob("*.yaml") for t in _targets(yaml.safe_load(f.read_text()))}
    found |= _targets(yaml.safe_load((CONF / "classifier.yaml").read_text())["classifier"])
    assert len(found) >= 25 and found <= BUILDABLE, sorted(found - BUILDABLE)
