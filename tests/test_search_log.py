"""The search log's table (study/trial.py): every trial of a <kind>.jsonl, in order, as markdown."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import study_script

ROOT = Path(__file__).resolve().parents[1]


def test_the_table_lists_every_trial_with_every_figure(tmp_path):
    log = tmp_path / "pretrain.jsonl"
    records = [
        {"trial": "pretrain", "sets": ["method.views=2"], "val": {"cls": {"knn_top1": 74.5}}, "seconds": 9},
        {"trial": "pretrain", "sets": [], "val": {"cls": {"knn_top1": 75.1}}, "cls_entropy_frac": 0.9},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = study_script("trial").write_table(log).read_text()
    assert table.splitlines()[2] == "| # | overrides | val.cls.knn_top1 | seconds | cls_entropy_frac |"
    assert "| 1 | `method.views=2` | 74.5 | 9 | – |" in table
    assert "| 2 | (defaults) | 75.1 | – | 0.9 |" in table


def test_the_committed_search_tables_are_those_of_their_logs(tmp_path):
    """results/search/*.md are written from the logs beside them, never edited by hand."""
    trial = study_script("trial")
    logs = sorted((ROOT / "results" / "search").glob("*.jsonl"))
    assert logs
    for log in logs:
        copy = tmp_path / log.name
        copy.write_text(log.read_text())
        assert trial.write_table(copy).read_text() == log.with_suffix(".md").read_text(), log.name
