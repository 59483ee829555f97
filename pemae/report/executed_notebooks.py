"""The executed notebooks of one seed, copied where git keeps them, so that a run reads (with its
outputs and figures) without rerunning it:

    python -m pemae.report.executed_notebooks RESULTS_DIR OUT_DIR [--seed 0]

The pipeline writes every executed notebook into its run's folder (a DVC output, absent from a new
clone); this copies seed `--seed`'s, and the figures' and cost notebooks, into OUT_DIR/<run>/ and
writes OUT_DIR/README.md, an index. The copies are byte-for-byte those the stages wrote.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def executed_notebooks(results_dir: str | Path, seed: int = 0) -> dict[str, list[Path]]:
    """{folder name: the executed notebooks}: every run's seed-`seed` notebooks under
    results/runs/<run>/seed<seed>/notebooks/, then `figures` (results/figures/**/*.ipynb)."""
    results_dir = Path(results_dir)
    found = {run.name: sorted((run / f"seed{seed}" / "notebooks").glob("*.ipynb"))
             for run in sorted((results_dir / "runs").iterdir()) if run.is_dir()}
    found["figures"] = sorted((results_dir / "figures").rglob("*.ipynb"))
    return {name: paths for name, paths in found.items() if paths}


def copy_executed_notebooks(results_dir: str | Path, out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Copy `executed_notebooks` into out_dir/<name>/ (out_dir is emptied of notebooks first, so a
    run that no longer exists leaves no stale copy) and write out_dir/README.md; the copies' paths."""
    found = executed_notebooks(results_dir, seed)
    if not found:
        raise FileNotFoundError(f"no executed notebooks under {results_dir}/runs/*/seed{seed}/notebooks "
                                f"or {results_dir}/figures: run the pipeline first (dvc repro)")
    out_dir = Path(out_dir)
    for old in out_dir.rglob("*.ipynb"):
        old.unlink()
    copies = []
    for name, paths in found.items():
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        copies += [Path(shutil.copyfile(p, out_dir / name / p.name)) for p in paths]
    index = [f"# Executed notebooks (seed {seed})", "",
             "Written by the `executed_notebooks` stage of dvc.yaml: each notebook as the pipeline ran it, "
             "with its outputs. The other seeds' are DVC outputs under `results/runs/<run>/seed<n>/notebooks/`.", ""]
    for name, paths in found.items():
        index.append(f"- **{name}**: " + ", ".join(f"[{p.stem}]({name}/{p.name})" for p in paths))
    (out_dir / "README.md").write_text("\n".join(index) + "\n")
    return copies


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{len(copy_executed_notebooks(args.results_dir, args.out_dir, args.seed))} notebooks "
          f"copied to {args.out_dir}")
