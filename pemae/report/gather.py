"""Reading a results folder: where a run's files are (`RunPaths`) and one row per run, seed and
readout with every metric it has (`gather`, `gather_folders` over several folders)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


READOUTS = ("cls", "avg", "pixels")  # table order
READOUT_NAMES = {"cls": "CLS", "avg": "avg patches", "pixels": "raw pixels"}
PROBE_METRICS = ("knn_top1", "linear_top1")  # one value per readout
RUN_METRICS = ("finetune_top1", "dense_miou", "pretrain_images_per_s")  # one value per run and seed
SPLITS = ("test", "val")  # test: the reported numbers; val: what tuning decisions are read from


class RunPaths:
    """Where the stages of one run and seed write (under results/runs/<run>/seed<seed>/)."""

    def __init__(self, results_dir: str | Path, run: str, seed: int):
        self.root = Path(results_dir) / "runs" / run / f"seed{seed}"
        self.pretrain = self.root / "pretrain"
        self.finetune = self.root / "finetune"
        self.evaluation = self.root / "evaluate.json"
        self.dense = self.root / "dense.json"
        self.dense_maps = self.root / "dense_maps.pt"  # predicted maps of the first test scenes
        self.encoder = self.pretrain / "encoder.pt"
        self.checkpoint = self.pretrain / "checkpoint.pt"


def scratch_results_dir() -> Path:
    """Where notebooks run on their own (nbval, by hand) write: a fixed folder under the temp dir."""
    return Path(tempfile.gettempdir()) / "pemae-scratch"


def run_names(results_dir: str | Path) -> list[str]:
    """The runs that have a folder under results_dir/runs, sorted."""
    runs = Path(results_dir) / "runs"
    return sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


def seed_numbers(results_dir: str | Path, run: str) -> list[int]:
    """The seeds s with a folder results_dir/runs/<run>/seed<s>/, in numeric order (every seed
    trained so far, whatever params.yaml `seeds` says)."""
    folder = Path(results_dir) / "runs" / run
    found = [p.name[len("seed"):] for p in folder.glob("seed*") if p.is_dir()] if folder.is_dir() else []
    return sorted(int(s) for s in found if s.isdigit())


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------------------------
# Gathering: one row per run, seed and readout
# --------------------------------------------------------------------------------------------
def _run_fields(pretrain: dict, finetune: dict, dense: dict, split: str) -> dict:
    """The fields of one run and seed that every readout row carries."""
    fields = {"pretrain_images_per_s": pretrain.get("images_per_s") or None,  # None: not pretrained
              "pretrain_final_loss": pretrain.get("final_loss"),
              "collapsed": pretrain.get("collapsed")}  # None: no pseudo labels or token targets
    if "targets_collapsed" in pretrain:
        fields["targets_collapsed"] = pretrain["targets_collapsed"]
    if f"{split}_top1" in finetune:
        fields["finetune_top1"] = finetune[f"{split}_top1"]
    if "protocol" in finetune:
        fields["finetune_protocol"] = finetune["protocol"]
    if "miou" in dense.get(split, {}):
        fields["dense_miou"] = dense[split]["miou"]
    return fields


def _seed_rows(paths: RunPaths, run: str, seed: int, split: str) -> list[dict]:
    """The rows of one run and seed; none when it has no file at all.

    Without an evaluation the run-level fields still come out, on one row with readout None.
    """
    pretrain = _read_json(paths.pretrain / "summary.json")
    finetune = _read_json(paths.finetune / "summary.json")
    evaluation, dense = _read_json(paths.evaluation), _read_json(paths.dense)
    if not (pretrain or finetune or evaluation or dense):
        return []
    fields = _run_fields(pretrain, finetune, dense, split)
    probes = evaluation.get(split, {})  # {readout: {knn_top1, linear_top1}}
    readouts = sorted(probes, key=readout_rank) or [None]
    return [{"run": run, "seed": seed, "readout": r, **probes.get(r, {}), **fields} for r in readouts]


def readout_rank(readout: str | None) -> int:
    return READOUTS.index(readout) if readout in READOUTS else len(READOUTS)


def gather(results_dir: str | Path, runs: list[str], seeds: list[int] | None = None,
           split: str = "test") -> list[dict]:
    """One row per (run, seed, readout) on `split`, in the order of `runs`, seeds, READOUTS.

    `seeds` None: every seed folder each run has (`seed_numbers`); a list: only those seeds.

    Keys: run, seed, readout, knn_top1, linear_top1, and on every readout row of a run and seed
    finetune_top1 (the fine-tune summary's `<split>_top1`), finetune_protocol, dense_miou,
    pretrain_images_per_s (None when not pretrained), pretrain_final_loss, collapsed.
    A stage that has not run leaves its keys out; a run and seed without any file gives no row.
    """
    return [row for run in runs for seed in (seed_numbers(results_dir, run) if seeds is None else seeds)
            for row in _seed_rows(RunPaths(results_dir, run, seed), run, seed, split)]


def gather_folders(results_dirs: list[str | Path], split: str = "test") -> list[dict]:
    """`gather` over several results folders (the pipeline's, the extra seeds', the ablations'):
    every run found in any of them with every seed it has in any of them (a seed in two folders:
    the earlier folder's), in the order the runs are first found."""
    rows, taken = [], set()
    runs = list(dict.fromkeys(run for folder in results_dirs for run in run_names(folder)))
    for run in runs:
        for folder in results_dirs:
            seeds = [s for s in seed_numbers(folder, run) if (run, s) not in taken]
            taken.update((run, s) for s in seeds)
            rows += gather(folder, [run], seeds, split)
    return sorted(rows, key=lambda r: (runs.index(r["run"]), r["seed"], readout_rank(r["readout"])))
