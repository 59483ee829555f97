"""The results of every run, gathered from the files the pipeline stages write."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

COLUMNS = ["run", "knn_top1", "linear_top1", "finetune_top1", "pretrain_images_per_s",
           "pretrain_final_loss", "collapsed"]


class RunPaths:
    """Where the stages of one run write (under results/runs/<run>/)."""

    def __init__(self, results_dir: str | Path, run: str):
        self.root = Path(results_dir) / "runs" / run
        self.pretrain = self.root / "pretrain"
        self.finetune = self.root / "finetune"
        self.evaluation = self.root / "evaluate.json"
        self.encoder = self.pretrain / "encoder.pt"
        self.checkpoint = self.pretrain / "checkpoint.pt"


def scratch_results_dir() -> Path:
    """Where notebooks run on their own (nbval, by hand) write: a fixed folder under the temp dir."""
    return Path(tempfile.gettempdir()) / "pemae-scratch"


def run_names(results_dir: str | Path) -> list[str]:
    """The runs that have a folder under results_dir/runs, sorted."""
    runs = Path(results_dir) / "runs"
    return sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def gather(results_dir: str | Path, runs: list[str]) -> list[dict]:
    """One row per run with every metric found (missing stages give missing keys)."""
    rows = []
    for run in runs:
        paths = RunPaths(results_dir, run)
        pre = _read_json(paths.pretrain / "summary.json")
        row = {"run": run, **_read_json(paths.evaluation),
               **_read_json(paths.finetune / "summary.json")}
        row["pretrain_images_per_s"] = pre.get("images_per_s") or None  # None: no pretraining
        row["pretrain_final_loss"] = pre.get("final_loss")
        row["collapsed"] = pre.get("collapsed")  # None for runs without pseudo labels
        rows.append(row)
    return rows


def format_cell(value) -> str:
    """A table cell: floats with two decimals, missing values as a dash."""
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict], columns: list[str] = COLUMNS, fmt=format_cell) -> str:
    """A GitHub markdown table of `rows`, each cell written by `fmt`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
