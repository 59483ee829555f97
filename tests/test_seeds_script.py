"""study/seeds.py: which runs still need seeds, and which seeds it never retrains."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import study_script

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_runs_of_unsettled_claims_need_seeds(tmp_path):
    seeds = study_script("seeds")
    claims = {"pemae beats mae": ["pemae", "mae"], "cls labels help": ["cls_labels", "pemae"]}
    path = tmp_path / "claims.json"
    assert seeds.unsettled_runs(path, claims) == {"pemae", "mae", "cls_labels"}  # nothing judged yet
    path.write_text(json.dumps({"test": {
        "a": {"claim": "pemae beats mae", "seeds_enough": True},
        "b": {"claim": "cls labels help", "seeds_enough": False}}}))
    assert seeds.unsettled_runs(path, claims) == {"cls_labels", "pemae"}


def test_a_seed_is_committed_only_when_git_tracks_its_probe_and_fine_tune_results():
    seeds = study_script("seeds")
    extra = Path("results/extra_seeds/runs/mae")
    tracked = sorted(p.parents[1].name for p in (ROOT / extra).glob("seed*/finetune/summary.json"))
    assert tracked, "the committed extra seeds are missing"
    assert seeds.committed(extra / tracked[0])
    assert not seeds.committed(extra / "seed99")
    assert not seeds.committed(Path("results/runs/mae/seed0/pretrain"))  # no results of its own there
