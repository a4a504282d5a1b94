"""The shape of the package: imports form no circle, and the repository refers to nothing outside itself."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "src" / "difflab"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the difflab modules it imports}, read from the source with ``ast`` (deferred imports included).

    ``from difflab.a import b`` counts as an import of ``difflab.a.b`` when that is a module, else of ``difflab.a``;
    importing ``difflab.a.b`` also runs ``difflab.a`` (its package ``__init__``), so that is an edge too.
    """
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                targets.update(found or [node.module])
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        edges = set()
        for target in targets:
            parts = target.split(".")
            edges.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))  # the packages on the way run too
        graph[name] = {t for t in edges if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports (first module repeated at its end), or None: depth-first search with colours."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_imports_form_no_cycle():
    graph = import_graph()
    assert {"difflab.build", "difflab.tasks.train", "difflab.metrics.features"} <= graph.keys()
    assert "difflab.build" in graph["difflab.metrics.features"]  # an edge the old circle ran through is seen
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_nothing_below_the_tasks_imports_them_and_the_math_imports_only_torch():
    graph = import_graph()
    entry_points = {"difflab.noise_report", "difflab.posthoc_ema"}  # `python -m difflab.<name>`: shims over tasks
    above = [m for m, targets in graph.items() if not m.startswith("difflab.tasks") and m not in entry_points
             for t in targets if t.startswith("difflab.tasks")]
    assert above == [], above
    for module in ("difflab.schedule", "difflab.losses", "difflab.objectives", "difflab.noise.statistics"):
        source = (PACKAGE / (module.removeprefix("difflab.").replace(".", "/") + ".py")).read_text()
        for banned in ("lightning", "hydra", "diffusers"):
            assert f"import {banned}" not in source and f"from {banned}" not in source, (module, banned)


OUTSIDE = "shared" + "/"
"""The workplace folder beside a checkout (split so that this file does not name it): a user's clone has none."""


def test_the_repository_refers_to_no_path_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = [
        name for name in tracked
        if not name.endswith((".png", ".npz"))
        and OUTSIDE in (ROOT / name).read_text(errors="ignore")
    ]
    assert offenders == []


def test_a_checkpoint_in_the_old_config_shape_still_loads_and_samples_the_same(trained_run, tmp_path):
    """Before the loss / conditioning / optimizer / lr_scheduler groups: loss as plain keys (or none),
    conditioning.enabled, AdamW's settings and the warm-up in model. Such a checkpoint loads as the same model."""
    import torch

    from difflab.build import load_checkpoint, read_checkpoint
    from difflab.samplers import DDIM

    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    old = ckpt["hyper_parameters"]["run_config"]
    old["model"] |= {"lr": old["optimizer"]["lr"], "weight_decay": 0.0, "adam_betas": [0.9, 0.999],
                     "warmup_steps": old["lr_scheduler"]["warmup_steps"]}
    for key in ("optimizer", "lr_scheduler", "loss"):
        del old[key]
    old["conditioning"] = {"enabled": False, "num_classes": None, "p_uncond": 0.0, "class_names": []}
    torch.save(ckpt, tmp_path / "old.ckpt")
    _, upgraded = read_checkpoint(tmp_path / "old.ckpt", "train")
    assert upgraded.optimizer.lr == upgraded.model.get("lr", upgraded.optimizer.lr) and "lr" not in upgraded.model
    assert upgraded.conditioning._target_ == "difflab.guidance.Unconditional"
    assert upgraded.loss._target_ == "difflab.objectives.DiffusionLoss"
    new_model, old_model = load_checkpoint(trained_run), load_checkpoint(tmp_path / "old.ckpt")
    images = [m.generate(DDIM(num_steps=3), 2, seed=1) for m in (new_model, old_model)]
    assert torch.equal(images[0], images[1])
