"""The DVC pipeline end to end on the tiny preset, in a scratch git repository.

`dvc repro` builds every stage (every run with two seeds, the raw-pixel baseline, the figures and
the cost); a second `dvc repro` does nothing; `dvc exp run -S` on a knob reruns only the stages
that depend on it; the small-data check, an ablation run and the claims table of `study/dvc.yaml`
run on their own, outside the main pipeline; pushed to a DVC remote, the trained pipeline pulls
into a fresh `git clone` that is up to date.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from pemae.config.params import build_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPIED = ["dvc.yaml", "study/dvc.yaml", "notebooks", "pemae", ".dvc/config", ".dvcignore"]
SEEDS = [0, 1]
EXTRA_SEEDS = [2]  # trained by study/dvc.yaml:extra_seed, into results/extra_seeds


def run(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t.invalid",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t.invalid")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path_factory.mktemp("pipeline")
    for name in COPIED:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    small_data = {"runs": default["small_data"]["runs"], "img_size": 16, "pretrain_epochs": 1,
                  "finetune_epochs": 1, "seeds": [0], "enforce": False}
    params = {"preset": "tiny", "seeds": SEEDS, "extra_seeds": EXTRA_SEEDS, **build_config("tiny").to_dict(),
              "runs": default["runs"], "comparisons": default["comparisons"], "claims": default["claims"],
              "ablations": default["ablations"], "small_data": small_data}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "pipeline"], repo)
    return repo


def stages(stage: str, runs, seeds=SEEDS) -> set[str]:
    return {f"{stage}@{r}-{s}" for r in runs for s in seeds}


def test_repro_builds_every_stage_then_is_up_to_date(repo):
    runs = yaml.safe_load((repo / "params.yaml").read_text())["runs"]
    first = stages_run(run(["dvc", "repro"], repo))
    expected = (stages("pretrain", runs) | stages("evaluate", runs) | stages("finetune", runs)
                | stages("dense", runs))
    assert first == expected | {f"pixels@{s}" for s in SEEDS} | {"figures", "cost", "executed_notebooks"}
    table = (repo / "results" / "results.md").read_text()
    assert all(f"| {r} |" in table for r in [*runs, "pixels"])
    assert "± " in table and "(scratch)" in table  # mean ± std over the seeds; the scratch baseline
    assert (repo / "results" / "results_val.md").is_file()
    for run_name in runs:
        for seed in SEEDS:
            assert (repo / "results" / "runs" / run_name / f"seed{seed}" / "evaluate.json").is_file()
    for png in ("pretrain_loss", "reconstructions", "accuracy", "results_table", "loss_terms",
                "collapse_monitors", "attention_maps", "pseudo_label_maps", "cost", "dense_predictions"):
        assert (repo / "results" / "figures" / f"{png}.png").stat().st_size > 1000
    readable = repo / "results" / "notebooks"  # seed 0's executed notebooks, kept by git
    assert (readable / "README.md").is_file() and (readable / "figures" / "05_figures.ipynb").is_file()
    for run_name in runs:
        assert (readable / run_name / "01_pretrain.ipynb").read_bytes() == \
            (repo / "results" / "runs" / run_name / "seed0" / "notebooks" / "01_pretrain.ipynb").read_bytes()
    second = run(["dvc", "repro"], repo)
    assert stages_run(second) == set()


def test_exp_run_reruns_only_what_depends_on_the_changed_knob(repo):
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "results"], repo)
    runs = yaml.safe_load((repo / "params.yaml").read_text())["runs"]
    out = run(["dvc", "exp", "run", "-S", "finetune.epochs=2"], repo)
    assert stages_run(out) == stages("finetune", runs) | {"figures", "executed_notebooks"}
    out = run(["dvc", "exp", "run", "-S", "evaluation.knn_k=5"], repo)  # not the dense probe's
    assert stages_run(out) == (stages("evaluate", runs) | {f"pixels@{s}" for s in SEEDS}
                               | {"figures", "executed_notebooks"})
    # a key the run does not set yet is added with a leading `+` (DVC's override syntax)
    out = run(["dvc", "exp", "run", "-S", "+runs.pemae.method.lambda_cls=0.5"], repo)
    assert stages_run(out) == (stages("pretrain", ["pemae"]) | stages("evaluate", ["pemae"])
                               | stages("finetune", ["pemae"]) | stages("dense", ["pemae"])
                               | {"figures", "executed_notebooks"})


def test_the_small_data_check_runs_from_the_study_pipeline(repo):
    out = run(["dvc", "repro", "study/dvc.yaml:small_data"], repo)
    assert stages_run(out) == {"study/dvc.yaml:small_data"}
    summary = json.loads((repo / "results" / "small_data" / "summary.json").read_text())
    runs = yaml.safe_load((repo / "params.yaml").read_text())["small_data"]["runs"]
    for split in ("val", "test"):
        assert {row["run"] for row in summary[split]["summary"].values()} == set(runs)
        assert {row["b"] for row in summary[split]["paired"].values()} == {"random"}
    assert isinstance(summary["failures"], list)  # enforce: false here, so listed, not raised
    assert (repo / "results" / "small_data" / "runs" / "mae" / "seed0" / "evaluate.json").is_file()
    assert "| random |" in (repo / "results" / "small_data" / "results.md").read_text()


def test_an_ablation_run_and_the_claims_table_run_from_the_study_pipeline(repo):
    out = run(["dvc", "repro", "study/dvc.yaml:ablation@token_recon-0"], repo)
    assert stages_run(out) == {"study/dvc.yaml:ablation@token_recon-0"}
    run_dir = repo / "results" / "ablations" / "runs" / "token_recon" / "seed0"
    saved = yaml.safe_load((run_dir / "pretrain" / "config.yaml").read_text())
    assert saved["method"]["teachers"] == "single" and saved["method"]["lambda_cls"] == 0.0
    assert (run_dir / "evaluate.json").is_file() and (run_dir / "finetune" / "summary.json").is_file()
    extra = [f"study/dvc.yaml:extra_seed@{r}-{EXTRA_SEEDS[0]}" for r in ("mae", "pemae")]
    for stage in extra:  # one more seed of a claim's two runs, one stage each
        assert stages_run(run(["dvc", "repro", "--single-item", stage], repo)) == {stage}
    seed_dir = repo / "results" / "extra_seeds" / "runs" / "pemae" / f"seed{EXTRA_SEEDS[0]}"
    assert all((seed_dir / f).is_file() for f in ("evaluate.json", "finetune/summary.json", "dense.json"))
    out = run(["dvc", "repro", "--single-item", "study/dvc.yaml:claims"], repo)  # no upstream ablations
    assert stages_run(out) == {"study/dvc.yaml:claims"}
    claims = json.loads((repo / "results" / "claims.json").read_text())["test"]
    assert claims["pemae-mae"]["cls/knn_top1"]["n"] == len(SEEDS) + 1  # every seed trained
    assert claims["token_recon-mae"]["cls/knn_top1"]["n"] == 1  # the one ablation seed trained
    assert claims["pemae-single_teacher"]["cls/knn_top1"] == {"verdict": "not run"}
    assert stages_run(run(["dvc", "repro"], repo)) == set()  # the main pipeline is untouched


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by its path relative to `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_pushed_pipeline_pulls_into_a_fresh_clone_up_to_date(repo, tmp_path):
    """docs/sharing.md's "Sharing trained runs": a DVC remote (a local folder here) set in the repository
    that ran the pipeline, `dvc push`; then `git clone` and `dvc pull` elsewhere give a clone that
    is up to date, the same files, and an encoder that loads into timm."""
    run(["dvc", "repro"], repo)  # nothing to do after the tests above; builds it when run alone
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], repo)
    run(["git", "add", "-A"], repo)  # dvc.lock, the small uncached outputs and the remote's config
    run(["git", "commit", "-q", "-m", "share the trained runs"], repo)
    run(["dvc", "push"], repo)
    assert any(p.is_file() for p in remote.rglob("*"))

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    encoder = Path("results/runs/mae/seed0/pretrain/encoder.pt")
    assert not (clone / encoder).exists() and not (clone / ".dvc" / "cache").exists()  # not in git
    # --allow-missing: the study stages that never ran here have nothing to pull
    run(["dvc", "pull", "--allow-missing"], clone)

    locks = [("dvc.yaml", clone / "dvc.lock"), ("study/dvc.yaml", clone / "study" / "dvc.lock")]
    ran = [f"{dvcfile}:{name}" for dvcfile, lock in locks if lock.is_file()
           for name in yaml.safe_load(lock.read_text())["stages"]]
    assert "Data and pipelines are up to date." in run(["dvc", "status", *ran], clone)
    out = run(["dvc", "repro"], clone)
    assert stages_run(out) == set() and "Data and pipelines are up to date." in out
    assert file_hashes(clone / "results") == file_hashes(repo / "results")

    # the README's one-liner loads the pulled encoder into timm
    blob = torch.load(clone / encoder, map_location="cpu", weights_only=True)
    vit = timm.create_model(blob["arch"], pretrained=True, num_classes=0, **blob["kwargs"],
                            pretrained_cfg_overlay=dict(file=str(clone / encoder), num_classes=0))
    for name, value in vit.state_dict().items():
        assert torch.equal(value, blob["state_dict"][name]), name
