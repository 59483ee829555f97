"""Train the claims' runs on more seeds, one DVC stage at a time, until the claims are settled:
every claim's 95% CI half-width on the CLS linear probe and on fine-tuning is at most 0.5 points,
or its runs have 10 seeds (`pemae.results`, docs/protocol.md).

    python study/seeds.py [--until-minutes M] [--dry-run]

Seed by seed (params.yaml `extra_seeds`, in order), each run of `runs:` and `ablations:` that a
claim still needs is trained (`study/dvc.yaml:extra_seed@<run>-<seed>` or
`ablation_extra_seed@<run>-<seed>`), then the claims are judged again (`study/dvc.yaml:claims`).
A run every claim of which is settled is skipped, and so is a seed whose results are already
committed (its `evaluate.json` and fine-tune `summary.json` tracked by git), even where a code edit
has made its stage stale: a new seed never retrains, and so never changes, a seed the claims
already read (`dvc repro` that stage by hand to retrain it). Stops when nothing is left, or before
starting a stage once `--until-minutes` have passed. Resumable: rerun it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# about how long one seed of a run takes on the 2-core CPU (pretrain + evaluate + fine-tune
# [+ dense]), to not start a stage that cannot finish before --until-minutes
MINUTES = {"mae": 7, "pemae": 10, "random": 4}
ABLATION_MINUTES = 9


def unsettled_runs(claims_path: Path, claims: dict[str, list[str]]) -> set[str]:
    """The runs of every claim not yet settled on the test split (results/claims.json's
    `seeds_enough`: the CLS linear and fine-tune CIs within 0.5 points, or 10 seeds); every
    claim's runs when no judgement exists yet."""
    if not claims_path.is_file():
        return {run for pair in claims.values() for run in pair}
    judged = json.loads(claims_path.read_text())["test"]
    needed: set[str] = set()
    for row in judged.values():
        if row.get("claim") in claims and not row.get("seeds_enough"):
            needed.update(claims[row["claim"]])
    return needed


def committed(seed_dir: Path) -> bool:
    """Whether git tracks this seed's results (`results/<study>/runs/<run>/seed<n>/`)."""
    wanted = [seed_dir / "evaluate.json", seed_dir / "finetune" / "summary.json"]
    tracked = subprocess.run(["git", "ls-files", "--", *map(str, wanted)], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    return len(tracked) == len(wanted)


def repro(stage: str, dry_run: bool) -> None:
    cmd = ["dvc", "repro", "--single-item", stage]
    print("$", " ".join(cmd), flush=True)
    if not dry_run:
        subprocess.run(cmd, cwd=REPO, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--until-minutes", type=float, default=float("inf"))
    parser.add_argument("--dry-run", action="store_true", help="print the stages, run nothing")
    args = parser.parse_args(argv)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    claims, runs, ablations = params["claims"], list(params["runs"]), list(params["ablations"])
    deadline = time.monotonic() + 60 * args.until_minutes
    for seed in params["extra_seeds"]:
        needed = unsettled_runs(REPO / "results" / "claims.json", claims)
        if not needed:
            print("every claim is settled: nothing to train")
            return 0
        # the pipeline's runs first (random too: the results table pairs against it), then the
        # ablations a claim still needs
        order = [r for r in runs if r in needed or r == "random"] + [r for r in ablations if r in needed]
        for run in order:
            kind, folder = ("extra_seed", "extra_seeds") if run in runs else ("ablation_extra_seed", "ablations")
            if committed(Path("results") / folder / "runs" / run / f"seed{seed}"):
                print(f"{run} seed {seed}: committed already, not retrained")
                continue
            if time.monotonic() + 60 * MINUTES.get(run, ABLATION_MINUTES) > deadline:
                print(f"stopping before {run} seed {seed}: --until-minutes reached")
                return 0
            repro(f"study/dvc.yaml:{kind}@{run}-{seed}", args.dry_run)
        repro("study/dvc.yaml:claims", args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
