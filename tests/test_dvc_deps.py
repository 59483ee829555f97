"""dvc.yaml lists, for every stage, each pemae module its notebook (or script) uses, directly or not:
an edit to any of them makes the stage stale."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def pemae_imports(source: str) -> set[str]:
    """Names of the pemae modules a piece of Python source imports ("pemae.data" -> "data")."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pemae":
            if node.module == "pemae":
                found |= {a.name for a in node.names if (REPO / "pemae" / f"{a.name}.py").is_file()}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pemae.")}
    return found


def modules_used(entry: Path) -> set[str]:
    """pemae modules reached from a notebook's code cells or a script, following imports transitively."""
    if entry.suffix == ".ipynb":
        cells = json.loads(entry.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    else:
        code = entry.read_text()
    todo, seen = pemae_imports("\n".join(line for line in code.splitlines()
                                         if not line.lstrip().startswith(("%", "!")))), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo |= pemae_imports((REPO / "pemae" / f"{name}.py").read_text())
    return seen


STAGES = {**yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"],
          **{f"study/dvc.yaml:{name}": spec for name, spec in
             yaml.safe_load((REPO / "study" / "dvc.yaml").read_text())["stages"].items()}}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_module_a_stage_uses_is_a_dependency(stage):
    spec = STAGES[stage].get("do", STAGES[stage])
    deps = set(spec["deps"])
    entries = [d for d in deps if d.endswith(".ipynb") or (d.endswith(".py") and not d.startswith("pemae/"))]
    assert entries and all(e in spec["cmd"] for e in entries)  # every notebook or script it runs
    used = {f"pemae/{m}.py" for e in entries for m in modules_used(REPO / e)}
    assert used, "the stage's notebooks and scripts import nothing from pemae"
    assert sorted(used - deps) == []


def test_the_import_walk_follows_imports():
    assert {"config", "presets"} <= modules_used(REPO / "notebooks" / "01_pretrain.ipynb")


def test_the_import_walk_reads_scripts_too():
    assert {"budget", "cli", "pretrain"} <= modules_used(REPO / "study" / "budget.py")
