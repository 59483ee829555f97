"""The executed_notebooks stage: seed 0's notebooks copied byte for byte where git keeps them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pemae.report.executed_notebooks import copy_executed_notebooks

REPO = Path(__file__).resolve().parents[1]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_copies_seed_zero_and_the_figures_notebooks_byte_for_byte_with_an_index(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    write(results / "runs/mae/seed0/notebooks/01_pretrain.ipynb", '{"mae": 0}')
    write(results / "runs/mae/seed1/notebooks/01_pretrain.ipynb", '{"mae": 1}')
    write(results / "runs/pixels/seed0/notebooks/02_evaluate.ipynb", '{"pixels": 0}')
    write(results / "runs/mae/seed0/pretrain/log.csv", "step\n")
    write(results / "figures/05_figures.ipynb", '{"figures": 0}')
    write(results / "figures/cost/06_cost.ipynb", '{"cost": 0}')
    write(out / "gone/01_pretrain.ipynb", "a run that no longer exists")

    copies = copy_executed_notebooks(results, out)

    assert sorted(p.relative_to(out).as_posix() for p in copies) == [
        "figures/05_figures.ipynb", "figures/06_cost.ipynb", "mae/01_pretrain.ipynb", "pixels/02_evaluate.ipynb"]
    assert (out / "mae/01_pretrain.ipynb").read_text() == '{"mae": 0}'  # seed 0, not seed 1
    assert not (out / "gone/01_pretrain.ipynb").exists()
    index = (out / "README.md").read_text()
    assert "[01_pretrain](mae/01_pretrain.ipynb)" in index and "[06_cost](figures/06_cost.ipynb)" in index
    assert "seed 0" in index


def test_another_seed_and_nothing_to_copy(tmp_path):
    write(tmp_path / "runs/mae/seed2/notebooks/01_pretrain.ipynb", '{"mae": 2}')
    assert [p.read_text() for p in copy_executed_notebooks(tmp_path, tmp_path / "out", seed=2)] == ['{"mae": 2}']
    with pytest.raises(FileNotFoundError, match="seed5"):
        copy_executed_notebooks(tmp_path, tmp_path / "out", seed=5)


def test_the_stage_keeps_its_copies_in_git():
    """cache: false, so the copies are committed; a .gitignore entry would hide them from a new clone."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["executed_notebooks"]
    out = stage["outs"][0]
    assert out == {"results/notebooks": {"cache": False}}
    assert "results/notebooks" in stage["cmd"] and "--seed 0" in stage["cmd"]
