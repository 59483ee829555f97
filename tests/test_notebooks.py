"""The notebooks as stored in git, and one run through papermill with injected parameters."""

import ast
import json
from pathlib import Path

import papermill
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").rglob("*.ipynb"))


def test_the_pipeline_notebooks_are_numbered_in_pipeline_order_and_the_studies_apart():
    names = [str(p.relative_to(ROOT / "notebooks")) for p in NOTEBOOKS]
    assert names == ["00_walkthrough.ipynb", "01_pretrain.ipynb", "02_evaluate.ipynb",
                     "03_finetune.ipynb", "04_dense.ipynb", "05_figures.ipynb", "06_cost.ipynb",
                     "studies/budget.ipynb", "studies/claims.ipynb", "studies/finetune_curve.ipynb",
                     "studies/small_data.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped_and_has_one_parameters_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        f"{path.name} has stored outputs: strip them before committing"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    source = "".join(tagged[0]["source"])
    assert "preset" not in parameter_names(source) or 'preset = "tiny"' in source, \
        "parameters must default to the tiny preset"


def parameter_names(source: str) -> list[str]:
    return [node.targets[0].id for node in ast.parse(source).body if isinstance(node, ast.Assign)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_parameters_cell_declares_only_what_the_notebook_uses(path):
    """DVC injects all of params.yaml; the parameters cell lists the keys this notebook reads."""
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    tagged = next(c for c in code if "parameters" in c.get("metadata", {}).get("tags", []))
    used = {node.id for c in code if c is not tagged
            for node in ast.walk(ast.parse("\n".join(line for line in "".join(c["source"]).splitlines()
                                                     if not line.lstrip().startswith(("%", "!")))))
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    unused = [name for name in parameter_names("".join(tagged["source"])) if name not in used]
    assert not unused, f"{path.name} declares parameters it never reads: {unused}"


def test_pretrain_notebook_runs_through_papermill_with_injected_parameters(tmp_path):
    out = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "01_pretrain.ipynb"), str(out),
        parameters={
            "preset": "tiny",
            "pretrain": {"epochs": 2, "batch_size": 32, "log_every": 4},
            "runs": {"smoke": {"model": {"mask_ratio": 0.5}}},
            "run_name": "smoke",
            "results_dir": str(tmp_path / "results"),
        },
        cwd=str(ROOT / "notebooks"), progress_bar=False, kernel_name="python3",
    )
    run_dir = tmp_path / "results" / "runs" / "smoke" / "seed0" / "pretrain"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["pretrain"]["epochs"] == 2 and saved["pretrain"]["batch_size"] == 32
    assert saved["model"]["mask_ratio"] == 0.5  # the run's own override
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 * (512 // 32)  # tiny preset: 512 training images (57 more for val)
    assert (run_dir / "encoder.pt").is_file() and (run_dir / "checkpoint.pt").is_file()
    executed = json.loads(out.read_text())
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in executed["cells"])


def test_bad_parameter_fails_the_notebook_with_the_key_named(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match=r"model\.mask_ratio"):
        papermill.execute_notebook(
            str(ROOT / "notebooks" / "01_pretrain.ipynb"), str(tmp_path / "bad.ipynb"),
            parameters={"model": {"mask_ratio": 1.5}, "results_dir": str(tmp_path)},
            cwd=str(ROOT / "notebooks"), progress_bar=False, kernel_name="python3",
        )
    assert not (tmp_path / "runs").exists()  # nothing was written before the error


def test_stages_run_notebooks_quietly_with_the_pemae_engine(tmp_path):
    """`papermill --engine pemae` (every stage of dvc.yaml) runs the kernel over an encrypted
    connection, so ipykernel's plain-TCP warning is gone from the stage output."""
    import subprocess
    import sys

    from papermill.engines import papermill_engines

    from pemae.notebook_engine import EncryptedKernelEngine

    assert papermill_engines.get_engine("pemae") is EncryptedKernelEngine
    stages = (ROOT / "dvc.yaml").read_text() + (ROOT / "study" / "dvc.yaml").read_text()
    assert "papermill notebooks/" not in stages and "papermill --engine pemae notebooks/" in stages
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "papermill"), str(ROOT / "notebooks" / "studies" / "claims.ipynb"),
         str(tmp_path / "out.ipynb"), "--engine", "pemae", "-p", "results_dir", str(tmp_path),
         "--no-progress-bar"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "without encryption" not in proc.stdout + proc.stderr
    assert (tmp_path / "claims.md").is_file()
