"""A results folder's tables: `results.md` (and `_val.md`, `.json`) with the results, paired
differences and claims per split, and `metrics.json`, the compact file `dvc metrics show` reads
(per run: the headline accuracies' mean, 95% CI half-width and seeds)."""

from __future__ import annotations

import json
from pathlib import Path

from pemae.report.claims import claim_verdicts, claims_markdown
from pemae.report.gather import SPLITS, gather, gather_folders
from pemae.report.tables import paired_differences, paired_markdown, results_markdown, summarise


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def split_results(results_dir: str | Path, runs: list[str], seeds: list[int] | None,
                  pairs: list[list[str]], split: str, claims: dict[str, list[str]] | None = None,
                  folders: list[str | Path] | None = None) -> dict[str, list[dict]]:
    """{"seeds": per-seed rows, "summary": mean ± std rows, "paired": paired differences,
    "claims": verdicts per claim} on `split`; `seeds` None: every seed trained. `folders`: the
    rows of `runs` from all of these results folders (`gather_folders`) instead of results_dir's."""
    if folders is None:
        rows = gather(results_dir, runs, seeds, split)
    else:
        rows = sorted((r for r in gather_folders(folders, split) if r["run"] in runs),
                      key=lambda r: runs.index(r["run"]))  # stable: seeds and readouts stay in order
    return {"seeds": rows, "summary": summarise(rows), "paired": paired_differences(rows, pairs),
            "claims": claim_verdicts(rows, claims or {})}


def keyed_rows(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Rows keyed by what they describe (dvc metrics diffs dicts key by key, not lists)."""
    key = {"seeds": lambda r: f"{r['run']}/seed{r['seed']}/{r['readout']}",
           "summary": lambda r: f"{r['run']}/{r['readout']}",
           "paired": lambda r: f"{r['a']}-{r['b']}/{r['readout_a']}-{r['readout_b']}/{r['metric']}",
           "claims": lambda r: f"{r['a']}-{r['b']}"}
    return {part: {key[part](r): r for r in rows} for part, rows in results.items()}


def report_markdown(results: dict[str, list[dict]], split: str) -> str:
    """The claims (if any), the results table and the paired differences of one split."""
    claims = (f"## The paper's claims ({split} split)\n\n" + claims_markdown(results["claims"]) + "\n"
              if results["claims"] else "")
    return (claims + f"## Results ({split} split)\n\n" + results_markdown(results["summary"])
            + f"\n## Paired differences ({split} split)\n\n" + paired_markdown(results["paired"]))


def write_results(results_dir: str | Path, runs: list[str], pairs: list[list[str]],
                  claims: dict[str, list[str]] | None = None, seeds: list[int] | None = None,
                  folders: list[str | Path] | None = None, stem: str = "results"
                  ) -> dict[str, dict[str, list[dict]]]:
    """Write results.md (test split), results_val.md (validation split) and results.json, over
    every seed each run has trained (`seeds`: only those, if given).

    `claims` {text: [a, b]}: the paper's claims, each judged a − b (the caller passes those whose
    runs are among `runs`, as for `pairs`). `folders`: read the runs from all of these results
    folders (every seed in any of them) rather than from results_dir; `stem` names the files
    (<stem>.md, <stem>_val.md, <stem>.json, in results_dir); the pipeline's own ("results") also
    writes metrics.json, the compact `headline_metrics` of the test split. Returns {split:
    {"seeds", "summary", "paired", "claims"}} for both splits, for the figures.
    """
    results_dir = Path(results_dir)
    results = {split: split_results(results_dir, runs, seeds, pairs, split, claims, folders) for split in SPLITS}
    (results_dir / f"{stem}.md").write_text(report_markdown(results["test"], "test"))
    (results_dir / f"{stem}_val.md").write_text(report_markdown(results["val"], "validation"))
    metrics = {split: keyed_rows(parts) for split, parts in results.items()}
    (results_dir / f"{stem}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if stem == "results":  # the pipeline's own: its compact metrics file
        (results_dir / "metrics.json").write_text(
            json.dumps({"test": headline_metrics(results["test"]["summary"])}, indent=2) + "\n")
    return results


HEADLINE_METRICS = {"knn_top1": "knn", "linear_top1": "linear", "finetune_top1": "finetune",
                    "dense_miou": "dense_miou"}  # metrics.json's names
HEADLINE_READOUTS = ("cls", "pixels")  # the probes' readout in metrics.json (raw pixels: their own)


def headline_metrics(summary_rows: list[dict]) -> dict[str, dict[str, float | int]]:
    """The compact metrics of `dvc metrics show` and `dvc exp show`: per run, each headline figure
    (CLS k-NN and linear probe, fine-tuning, dense mIoU) as its mean over seeds and the half-width
    of its 95% t interval (`<name>_ci95`, absent for one seed), and the number of seeds."""
    out: dict[str, dict] = {}
    for row in summary_rows:
        if row["readout"] not in HEADLINE_READOUTS:
            continue
        run = out.setdefault(row["run"], {"seeds": len(row["seeds"])})
        for metric, name in HEADLINE_METRICS.items():
            if f"{metric}_mean" in row:
                run[name] = round(row[f"{metric}_mean"], 2)
                if row[f"{metric}_ci95"] is not None:
                    run[f"{name}_ci95"] = round(row[f"{metric}_ci95"], 2)
    return out
