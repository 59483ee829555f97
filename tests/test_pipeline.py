"""The DVC pipeline end to end on the tiny preset, in a scratch git repository.

`dvc repro` builds every stage; a second `dvc repro` does nothing; `dvc exp run -S` on a
fine-tuning knob reruns only the fine-tuning stages and the figures.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pemae.config import build_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPIED = ["dvc.yaml", "notebooks", "pemae", ".dvc/config", ".dvcignore"]


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
    params = {"preset": "tiny", **build_config("tiny").to_dict(),
              "runs": yaml.safe_load((ROOT / "params.yaml").read_text())["runs"]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "pipeline"], repo)
    return repo


def test_repro_builds_every_stage_then_is_up_to_date(repo):
    runs = yaml.safe_load((repo / "params.yaml").read_text())["runs"]
    first = stages_run(run(["dvc", "repro"], repo))
    expected = {f"{stage}@{r}" for stage in ("pretrain", "evaluate", "finetune") for r in runs}
    assert first == expected | {"figures", "cost"}
    table = (repo / "results" / "results.md").read_text()
    assert all(f"| {r} |" in table for r in runs)
    for png in ("pretrain_loss", "reconstructions", "accuracy", "results_table", "loss_terms",
                "collapse_monitors", "attention_maps", "pseudo_label_maps", "cost"):
        assert (repo / "results" / "figures" / f"{png}.png").stat().st_size > 1000
    second = run(["dvc", "repro"], repo)
    assert stages_run(second) == set()


def test_exp_run_reruns_only_what_depends_on_the_changed_knob(repo):
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "results"], repo)
    runs = yaml.safe_load((repo / "params.yaml").read_text())["runs"]
    out = run(["dvc", "exp", "run", "-S", "finetune.epochs=2"], repo)
    assert stages_run(out) == {f"finetune@{r}" for r in runs} | {"figures"}
    out = run(["dvc", "exp", "run", "-S", "evaluation.knn_k=5"], repo)
    assert stages_run(out) == {f"evaluate@{r}" for r in runs} | {"figures"}
    # a key the run does not set yet is added with a leading `+` (DVC's override syntax)
    out = run(["dvc", "exp", "run", "-S", "+runs.pemae.method.lambda_cls=0.5"], repo)
    assert stages_run(out) == {"pretrain@pemae", "evaluate@pemae", "finetune@pemae", "figures"}
