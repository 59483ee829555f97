"""The budget study (pemae/studies/budget.py, pemae/studies/budget_report.py, study/budget.py): its config, the
order of its jobs, the schedules scaled with the budget, a resumable job that keeps no weights,
and the report's verdicts recomputed from the per-seed files."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import yaml

from pemae.config.params import build_config, config_for_run, named_runs, read_params
from pemae.config.schema import ConfigError
from pemae.report.stats import judge_differences
from pemae.studies.budget import PARTS, BudgetConfig, Job, job_config, jobs
from pemae.studies.budget_figures import _band
from pemae.studies.budget_report import equal_compute_pairs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params() -> dict:
    return read_params(REPO / "params.yaml")


def tiny_params(params: dict, **budget) -> dict:
    """params.yaml's runs and claims on the tiny preset (1 epoch), with a small study."""
    tiny = {k: v for k, v in params.items() if k not in build_config("tiny").to_dict()}
    study = {"runs": ["mae", "pemae"], "epochs": [1, 2], "seeds": [0, 1], "base_epochs": 1,
             "long_finetune_epochs": 2, "long_finetune_seeds": [0], **budget}
    return {**tiny, "preset": "tiny", "budget": study}


def test_params_yaml_study_is_valid_and_its_base_is_the_pipeline(params):
    bc = BudgetConfig.from_params(params)
    assert bc.base_epochs == params["pretrain"]["epochs"]
    # the base budget's config is the pipeline's own, key for key: its runs are reused, not retrained
    sections = {k: params.get(k) for k in build_config().to_dict()}
    for run in bc.runs:
        pipeline = config_for_run("default", sections, named_runs(params["runs"], params["ablations"]), run, 1)
        assert job_config(params, bc, Job(run, bc.base_epochs, 1)).to_dict() == pipeline.to_dict()


@pytest.mark.parametrize("change, message", [
    ({"epochs": [6, 18]}, "must hold the pipeline's budget"),
    ({"base_epochs": 3, "epochs": [3, 6]}, "must be the pipeline's pretrain.epochs"),
    ({"runs": ["mae", "nope"]}, "budget.runs names 'nope'"),
    ({"colour": 1}, "unknown key(s) budget.colour"),
    ({"long_finetune_seeds": [7]}, "must be among budget.seeds"),
    ({"epochs": [2, 0]}, "whole numbers >= 1"),
])
def test_bad_study_config_names_the_key(params, change, message):
    bad = copy.deepcopy(params)
    bad["budget"].update(change)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BudgetConfig.from_params(bad)


def test_jobs_come_smaller_budgets_first_then_the_largest_seed_by_seed(params):
    names = [job.name for job in jobs(BudgetConfig.from_params(params))]
    assert names == ["mae-e6-s0", "pemae-e6-s0", "mae-e6-s1", "pemae-e6-s1", "mae-e6-s2", "pemae-e6-s2",
                     "mae-e18-s0", "pemae-e18-s0", "mae-e18-s1", "pemae-e18-s1", "mae-e18-s2",
                     "pemae-e18-s2", "random-e0-s0"]
    parts = {job.name: job.parts for job in jobs(BudgetConfig.from_params(params))}
    assert parts["pemae-e18-s0"] == PARTS and parts["pemae-e18-s1"] == PARTS[:4]
    assert parts["random-e0-s0"] == ("pretrain", "finetune_long")


def test_epoch_counted_schedules_scale_with_the_budget(params):
    bc = BudgetConfig.from_params(params)
    base = job_config(params, bc, Job("pemae", 2, 0))
    for epochs in (6, 18):
        cfg = job_config(params, bc, Job("pemae", epochs, 0), {"data": {"num_workers": 1}})
        scale = epochs / 2
        assert cfg.pretrain.epochs == epochs
        assert math.isclose(cfg.pretrain.warmup_epochs, base.pretrain.warmup_epochs * scale)
        assert math.isclose(cfg.method.freeze_last_layer_epochs, base.method.freeze_last_layer_epochs * scale)
        # fractions of the run, and everything else, stay as the pipeline has them
        assert cfg.method.teacher_temp_warmup == base.method.teacher_temp_warmup
        assert cfg.finetune == base.finetune and cfg.model == base.model
        assert cfg.data.num_workers == 1
    assert job_config(params, bc, Job("random", 0, 0)).pretrain.epochs == 0


def test_equal_compute_pairs_budgets_of_about_the_same_cost():
    minutes = {("pemae", 2): 4.24, ("pemae", 6): 12.7, ("pemae", 18): 38.1,
               ("mae", 2): 1.60, ("mae", 6): 4.81, ("mae", 18): 14.4}
    pairs = equal_compute_pairs({"PEMAE beats MAE": ["pemae", "mae"]}, [2, 6, 18], minutes)
    assert pairs == [("PEMAE beats MAE", "pemae", 2, "mae", 6), ("PEMAE beats MAE", "pemae", 6, "mae", 18)]


def test_a_job_resumes_keeps_no_weights_and_the_report_recomputes(params, tmp_path):
    """One tiny study through the runner (two jobs at once): every job's files, no weights left,
    a second run does nothing, and each verdict of budget.json is `judge` on the per-seed files."""
    small = tiny_params(params, epochs=[1, 2], seeds=[0, 1], long_finetune_seeds=[0])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small))
    root = tmp_path / "train"
    cmd = [sys.executable, str(REPO / "study" / "budget.py"), "--params", str(tmp_path / "params.yaml"),
           "--root", str(root), "--jobs", "2"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    bc = BudgetConfig.from_params(small)
    assert all(job.done(root) for job in jobs(bc))
    assert not list(root.rglob("*.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.json")}
    again = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    assert f"{len(jobs(bc))} of {len(jobs(bc))} jobs done; 0 to run" in again.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in root.rglob("*.json")}
    assert len((root / "jobs.jsonl").read_text().splitlines()) == len(jobs(bc))

    from pemae.studies.budget import train_pipeline_runs
    from pemae.studies.budget_report import write_report

    train_pipeline_runs(small, bc, tmp_path / "pipeline")
    report = write_report(small, bc, root, [tmp_path / "pipeline"], None, tmp_path / "out")
    assert report["jobs_left"] == []
    assert {"budget.md", "budget.json", "budget.png", "monitors.png"} <= {p.name for p in (tmp_path / "out").iterdir()}
    at_2 = next(r for r in report["test"]["equal_epochs"] if r["epochs"] == [2, 2])
    cell = at_2["cls/linear_top1"]

    def linear(folder: Path, run: str, seed: int) -> float:
        scores = json.loads((folder / "runs" / run / f"seed{seed}" / "evaluate.json").read_text())
        return scores["test"]["cls"]["linear_top1"]

    expected = judge_differences([linear(root / "e2", "pemae", s) - linear(root / "e2", "mae", s) for s in (0, 1)])
    assert cell["verdict"] == expected["verdict"]
    assert math.isclose(cell["ci_low"], expected["ci_low"]) and math.isclose(cell["ci_high"], expected["ci_high"])
    at_1 = next(r for r in report["test"]["equal_epochs"] if r["epochs"] == [1, 1])
    expected = judge_differences([linear(tmp_path / "pipeline", "pemae", s)
                                  - linear(tmp_path / "pipeline", "mae", s) for s in (0, 1)])
    assert math.isclose(at_1["cls/linear_top1"]["mean"], expected["mean"])


def test_bad_set_fails_before_any_training(params, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(params)))
    done = subprocess.run([sys.executable, str(REPO / "study" / "budget.py"), "--params",
                           str(tmp_path / "params.yaml"), "--root", str(tmp_path / "train"),
                           "--set", "pretrain.epoch=3"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "pretrain.epoch: unknown key" in done.stderr
    assert not (tmp_path / "train").exists()


def test_a_budget_with_one_seed_gets_a_hollow_point_and_no_band():
    fig, ax = plt.subplots()
    _band(ax, [2, 6, 18], [[76.0, 77.0, 78.0], [78.0, 79.0, 80.0], [81.5]], label="mae")
    hollow = [line for line in ax.lines if line.get_markerfacecolor() == "white"]
    assert [list(line.get_xdata()) for line in hollow] == [[18]]
    band = ax.collections[0].get_paths()[0].vertices  # fill_between's polygon
    assert 6 in band[:, 0] and 18 not in band[:, 0]  # the interval ends where the seeds do
    plt.close(fig)
