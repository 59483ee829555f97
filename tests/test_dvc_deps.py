"""dvc.yaml lists, for every stage, each pemae module its notebook (or script) uses, directly or not:
an edit to any of them makes the stage stale."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def module_file(dotted: str) -> str | None:
    """The repository path of a pemae module ("pemae.engine.pretrain" -> "pemae/engine/pretrain.py");
    None for a package or a name that is not a module."""
    path = dotted.replace(".", "/") + ".py"
    return path if (REPO / path).is_file() else None


def pemae_imports(source: str) -> set[str]:
    """The files of the pemae modules a piece of Python source imports ("pemae/data/sources.py")."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pemae":
            found |= {module_file(f"{node.module}.{a.name}") or module_file(node.module) for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {module_file(a.name) for a in node.names if a.name.startswith("pemae.")}
    return found - {None}


def modules_used(entry: Path) -> set[str]:
    """The pemae files reached from a notebook's code cells or a script, following imports transitively."""
    if entry.suffix == ".ipynb":
        cells = json.loads(entry.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    else:
        code = entry.read_text()
    todo, seen = pemae_imports("\n".join(line for line in code.splitlines()
                                         if not line.lstrip().startswith(("%", "!")))), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo |= pemae_imports((REPO / path).read_text())
    return seen


STAGES = {**yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"],
          **{f"study/dvc.yaml:{name}": spec for name, spec in
             yaml.safe_load((REPO / "study" / "dvc.yaml").read_text())["stages"].items()}}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_module_a_stage_uses_is_a_dependency(stage):
    spec = STAGES[stage].get("do", STAGES[stage])
    deps = set(spec["deps"])
    entries = [d for d in deps if not d.startswith(("results/", "pemae/")) and d.endswith((".ipynb", ".py"))]
    assert all(e in spec["cmd"] for e in entries)  # every notebook or script it runs
    run_modules = {module_file(m) for m in re.findall(r"-m (pemae[\w.]*)", spec["cmd"])}  # python -m pemae.x
    assert None not in run_modules, f"{stage} runs a pemae module that does not exist"
    entries += sorted(run_modules)
    assert entries, f"{stage} runs no notebook, script or pemae module"
    used = run_modules | {path for e in entries for path in modules_used(REPO / e)}
    assert used, "the stage's notebooks and scripts import nothing from pemae"
    assert sorted(used - deps) == []


def test_the_import_walk_follows_imports():
    assert {"pemae/config/params.py", "pemae/config/presets.py"} <= modules_used(REPO / "notebooks" / "01_pretrain.ipynb")


def test_the_import_walk_reads_scripts_too():
    assert {"pemae/studies/budget.py", "pemae/cli.py", "pemae/engine/pretrain.py"} <= modules_used(REPO / "study" / "budget.py")


PEMAE_METHOD_FILES = {"pemae/models/pemae.py", "pemae/models/losses.py", "pemae/models/heads.py",
                      "pemae/models/teachers.py", "pemae/models/monitors.py"}


@pytest.mark.parametrize("stage", [s for s in STAGES if "finetune" in s])
def test_fine_tuning_depends_on_the_encoder_not_on_the_pemae_method(stage):
    """An edit to PEMAE's loss, heads or teachers leaves every fine-tune stage fresh: fine-tuning
    reads encoder.pt and builds the encoder alone."""
    spec = STAGES[stage].get("do", STAGES[stage])
    assert "pemae/models/encoder.py" in spec["deps"]
    assert not PEMAE_METHOD_FILES & set(spec["deps"])
