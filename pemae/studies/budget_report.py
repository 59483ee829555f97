"""The budget study's report (notebooks/studies/budget.ipynb): the results per pretraining budget, the
claims judged at each budget and at about equal compute, the long fine-tunes, the collapse
monitors along the budget, and the figures.

Rows are `pemae.report.gather.gather` rows with an `epochs` key: the pipeline's budget from the
pipeline's folders, the others from the study's (`pemae.studies.budget`), the references (random encoder,
raw pixels) at epochs 0. Every verdict is `pemae.report.stats`' rule (paired by seed, 95% t interval).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from pemae.engine.runtime import read_log  # noqa: E402
from pemae.report.claims import CLAIM_METRICS, claim_verdicts, claims_markdown  # noqa: E402
from pemae.report.gather import gather, gather_folders  # noqa: E402
from pemae.report.stats import mean_std  # noqa: E402
from pemae.report.tables import METRIC_NAMES, markdown_table, paired_differences  # noqa: E402
from pemae.studies.budget import (PIXELS, REFERENCE_RUN, BudgetConfig, Job, long_finetune_dir)  # noqa: E402
from pemae.studies.budget import MONITORS, metric_values, pretrain_log  # noqa: E402
from pemae.studies.budget_figures import budget_figure, monitors_figure  # noqa: E402


EQUAL_COMPUTE = (0.8, 1.25)  # two runs are at about equal compute when their costs are within this ratio


def label(run: str, epochs: int) -> str:
    return f"{run}@{epochs}ep"


# --------------------------------------------------------------------------------------------
# Gathering
# --------------------------------------------------------------------------------------------
def budget_rows(bc: BudgetConfig, root: str | Path, pipeline_dirs: list[str | Path],
                split: str = "test") -> list[dict]:
    """Per-seed rows of every budget's runs (the seeds of `bc.seeds` that are done) and of the
    references, each with `epochs` (0 for the references)."""
    pipeline = [r for r in gather_folders(pipeline_dirs, split) if r["seed"] in bc.seeds]
    rows = []
    for epochs in sorted(bc.epochs):
        if epochs == bc.base_epochs:
            chosen = [r for r in pipeline if r["run"] in bc.runs]
        else:
            chosen = [r for run in bc.runs for seed in bc.seeds if Job(run, epochs, seed).done(root)
                      for r in gather(Path(root) / f"e{epochs}", [run], [seed], split)]
        rows += [{**r, "epochs": epochs} for r in chosen]
    return rows + [{**r, "epochs": 0} for r in pipeline if r["run"] in (REFERENCE_RUN, PIXELS)]


def labelled(rows: list[dict]) -> list[dict]:
    """Rows whose run names carry their budget (`mae@6ep`; references keep their names)."""
    return [{**r, "run": r["run"] if r["epochs"] == 0 else label(r["run"], r["epochs"])} for r in rows]


def pipeline_summary(pipeline_dirs: list[str | Path], run: str) -> dict:
    """The pretraining summary of the pipeline's seed-0 run of `run`."""
    for folder in pipeline_dirs:
        summary = Path(folder) / "runs" / run / "seed0" / "pretrain" / "summary.json"
        if summary.is_file():
            return json.loads(summary.read_text())
    raise FileNotFoundError(f"no pretraining summary of run {run!r} (seed 0) under "
                            f"{', '.join(map(str, pipeline_dirs))}")


def steps_per_epoch(pipeline_dirs: list[str | Path], run: str, base_epochs: int) -> float:
    """Optimiser steps per epoch of a run, from the pipeline's seed-0 pretraining summary."""
    return pipeline_summary(pipeline_dirs, run)["steps"] / base_epochs


def cost_variant(run_config) -> str:
    """The row of results/cost.json that times a run's training step."""
    method = run_config.method
    return "mae" if method.name == "mae" else f"pemae_{method.teachers}"


def cpu_minutes(epochs: int, steps: float, step_ms: float) -> float:
    """Pretraining CPU-minutes of a budget: its steps at the step time of results/cost.json."""
    return epochs * steps * step_ms / 60000


# --------------------------------------------------------------------------------------------
# Verdicts: at equal epochs and at about equal compute
# --------------------------------------------------------------------------------------------
def claims_per_budget(rows: list[dict], claims: dict[str, list[str]], budgets: list[int]) -> list[dict]:
    """Each claim whose runs are the study's, judged at each budget on the seeds both have."""
    out = []
    for epochs in budgets:
        at = [r for r in rows if r["epochs"] == epochs]
        named = {f"{text}, {epochs} epoch{'s' if epochs != 1 else ''} each": pair for text, pair in claims.items()}
        out += [{**row, "epochs": [epochs, epochs]} for row in claim_verdicts(at, named)]
    return out


def equal_compute_pairs(claims: dict[str, list[str]], budgets: list[int],
                        minutes: dict[tuple[str, int], float]) -> list[tuple[str, str, int, str, int]]:
    """(claim, a, epochs of a, b, epochs of b) for every pair of budgets at which a claim's two runs
    cost about the same (ratio within EQUAL_COMPUTE) and not the same number of epochs."""
    low, high = EQUAL_COMPUTE
    return [(text, a, ea, b, eb) for text, (a, b) in claims.items() for ea in budgets for eb in budgets
            if ea != eb and (a, ea) in minutes and (b, eb) in minutes
            and low <= minutes[(a, ea)] / minutes[(b, eb)] <= high]


def claims_equal_compute(rows: list[dict], pairs: list[tuple], minutes: dict) -> list[dict]:
    """The claims of `equal_compute_pairs`, paired by seed number across the two budgets."""
    named = labelled(rows)
    out = []
    for text, a, ea, b, eb in pairs:
        claim = (f"{text} at about equal compute: {a} {ea} ep ({minutes[(a, ea)]:.1f} CPU-min) vs "
                 f"{b} {eb} ep ({minutes[(b, eb)]:.1f})")
        out += [{**row, "epochs": [ea, eb]} for row in
                claim_verdicts(named, {claim: [label(a, ea), label(b, eb)]})]
    return out


def against_pixels(rows: list[dict], bc: BudgetConfig) -> list[dict]:
    """Each run and budget minus the raw pixels on the CLS probes, paired by seed."""
    pixels = [r for r in labelled(rows) if r["run"] == PIXELS]
    out = []
    for epochs in sorted(bc.epochs):
        for run in bc.runs:
            at = [r for r in labelled(rows) if r["run"] == label(run, epochs)] + pixels
            out += [{**d, "epochs": epochs, "run": run}
                    for d in paired_differences(at, [[label(run, epochs), PIXELS]], ("knn_top1", "linear_top1"))
                    if d["readout_a"] == "cls"]
    return out


# --------------------------------------------------------------------------------------------
# The long fine-tunes and the monitors, from the runs' own files
# --------------------------------------------------------------------------------------------
def long_finetunes(bc: BudgetConfig, root: str | Path) -> list[dict]:
    """One row per long fine-tune done: run, epochs (of pretraining), seed, val_top1 per
    fine-tuning epoch, test_top1 at its end."""
    largest = max(bc.epochs)
    out = []
    for run, epochs in [(r, largest) for r in bc.runs] + [(REFERENCE_RUN, 0)]:
        for seed in bc.long_finetune_seeds:
            folder = long_finetune_dir(Job(run, epochs, seed).paths(root))
            if (folder / "summary.json").is_file():
                log = read_log(folder / "log.csv")
                out.append({"run": run, "epochs": epochs, "seed": seed, "val_top1": list(log["val_top1"]),
                            "test_top1": json.loads((folder / "summary.json").read_text())["test_top1"]})
    return out


def first_epoch_at(values: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(values) if v >= target), None)


def final_monitors(bc: BudgetConfig, root: str | Path, pipeline_dirs: list[str | Path]) -> list[dict]:
    """The collapse monitors at the end of pretraining, mean over the seeds done, per run (with
    pseudo labels) and budget."""
    out = []
    for run in bc.runs:
        for epochs in sorted(bc.epochs):
            logs = [read_log(p) for s in bc.seeds
                    if (p := pretrain_log(bc, root, pipeline_dirs, run, epochs, s)) is not None]
            logs = [log for log in logs if all(m in log for m in MONITORS)]
            if logs:
                out.append({"run": run, "epochs": epochs, "n": len(logs),
                            **{m: statistics.fmean(float(log[m][-1]) for log in logs) for m in MONITORS}})
    return out


def ci_cell(values: list[float]) -> str:
    """`mean ± 95% half-width (n)`; a single seed: the value and (n 1)."""
    if not values:
        return "–"
    stats = mean_std(values)
    spread = f" ± {stats['ci95']:.2f}" if stats["ci95"] is not None else ""
    return f"{stats['mean']:.2f}{spread} (n {stats['n']})"


TABLE_COLUMNS = ["run", "epochs", "CPU-min", "k-NN (CLS)", "linear (CLS)", "linear (avg)", "fine-tune",
                 "dense mIoU"]


def results_table(rows: list[dict], bc: BudgetConfig, minutes: dict[tuple[str, int], float]) -> str:
    cells = []
    for run, epochs in ([(r, e) for e in sorted(bc.epochs) for r in bc.runs]
                        + [(REFERENCE_RUN, 0), (PIXELS, 0)]):
        readout = "pixels" if run == PIXELS else "cls"
        cells.append({"run": run, "epochs": str(epochs),
                      "CPU-min": f"{minutes[(run, epochs)]:.1f}" if (run, epochs) in minutes else "–",
                      "k-NN (CLS)": ci_cell(metric_values(rows, run, epochs, readout, "knn_top1")),
                      "linear (CLS)": ci_cell(metric_values(rows, run, epochs, readout, "linear_top1")),
                      "linear (avg)": ci_cell(metric_values(rows, run, epochs, "avg", "linear_top1")),
                      "fine-tune": ci_cell(metric_values(rows, run, epochs, None, "finetune_top1")),
                      "dense mIoU": ci_cell(metric_values(rows, run, epochs, None, "dense_miou"))})
    return markdown_table(cells, TABLE_COLUMNS, fmt=str)


def _diff_text(cell: dict) -> str:
    if cell.get("ci_low") is None:
        return f"{cell.get('verdict')}" + (f" ({cell['mean']:+.2f}, n {cell['n']})" if "mean" in cell else "")
    return f"{cell['mean']:+.2f} [{cell['ci_low']:+.2f}, {cell['ci_high']:+.2f}] {cell['verdict']}"


def trend_lines(claim_rows: list[dict]) -> list[str]:
    """One line per claim and metric: the paired difference at each budget, in the rule's words."""
    lines = []
    for readout, metric in CLAIM_METRICS:
        key = f"{readout}/{metric}"
        name = METRIC_NAMES.get(metric, metric) + (" (CLS)" if readout == "cls" else "")
        parts = [f"{row['epochs'][0]} ep: {_diff_text(row[key])}" for row in claim_rows]
        lines.append(f"- {name}: " + "; ".join(parts))
    return lines


def pixels_lines(diffs: list[dict], bc: BudgetConfig) -> list[str]:
    lines = []
    for run in bc.runs:
        for metric in ("knn_top1", "linear_top1"):
            parts = [f"{d['epochs']} ep: {_diff_text(d)}" for d in diffs if d["run"] == run and d["metric"] == metric]
            if parts:
                lines.append(f"- {run} − raw pixels, {METRIC_NAMES[metric]} (CLS): " + "; ".join(parts))
    return lines


def long_finetune_lines(rows: list[dict], target: float) -> list[str]:
    lines = []
    for row in rows:
        reached = first_epoch_at(row["val_top1"], target)
        best = max(row["val_top1"])
        where = (f"validation reaches {target:.0f}% at fine-tuning epoch {reached}" if reached else
                 f"validation does not reach {target:.0f}% in {len(row['val_top1'])} epochs (best "
                 f"{best:.2f}, epoch {row['val_top1'].index(best) + 1})")
        source = "random encoder (from scratch)" if row["epochs"] == 0 else f"{row['run']} {row['epochs']} ep"
        lines.append(f"- {source}, seed {row['seed']}: {where}; test {row['test_top1']:.2f} after "
                     f"{len(row['val_top1'])} epochs")
    return lines


def monitors_table(rows: list[dict]) -> str:
    cells = [{"run": r["run"], "epochs": str(r["epochs"]), "seeds": str(r["n"]),
              **{m: f"{r[m]:.3g}" for m in MONITORS}} for r in rows]
    return markdown_table(cells, ["run", "epochs", "seeds", *MONITORS], fmt=str)


# --------------------------------------------------------------------------------------------
# The whole report
# --------------------------------------------------------------------------------------------
def cpu_minutes_table(params: dict, bc: BudgetConfig, pipeline_dirs: list[str | Path],
                      cost_json: str | Path | None) -> dict[tuple[str, int], float]:
    """{(run, epochs): pretraining CPU-minutes}, from the step times of `cost_json` (results/cost.json,
    a clean timing); without one, from the seconds the pipeline's seed-0 run took (noisier)."""
    from pemae.studies.budget import job_config

    costs = json.loads(Path(cost_json).read_text()) if cost_json and Path(cost_json).is_file() else None
    out = {}
    for run in bc.runs:
        steps = steps_per_epoch(pipeline_dirs, run, bc.base_epochs)
        if costs is not None:
            step_ms = costs[cost_variant(job_config(params, bc, Job(run, bc.base_epochs, bc.seeds[0])))]["step_ms"]
        else:
            summary = pipeline_summary(pipeline_dirs, run)
            step_ms = 1000 * summary["seconds"] / summary["steps"]
        out.update({(run, e): cpu_minutes(e, steps, step_ms) for e in bc.epochs})
    return out


def study_claims(params: dict, bc: BudgetConfig) -> dict[str, list[str]]:
    """The paper's claims (params.yaml `claims:`) whose two runs the study trains."""
    return {text: pair for text, pair in (params.get("claims") or {}).items() if set(pair) <= set(bc.runs)}


def write_report(params: dict, bc: BudgetConfig, root: str | Path, pipeline_dirs: list[str | Path],
                 cost_json: str | Path, out_dir: str | Path, target_top1: float = 90.0) -> dict:
    """budget.md, budget.json, budget.png and monitors.png into `out_dir`; returns the json."""
    from pemae.studies.budget import jobs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    minutes = cpu_minutes_table(params, bc, pipeline_dirs, cost_json)
    claims = study_claims(params, bc)
    budgets = sorted(bc.epochs)
    left = [job.name for job in jobs(bc) if not job.done(root)]
    report: dict = {"jobs_left": left, "cpu_minutes": {label(r, e): m for (r, e), m in minutes.items()}}
    for split in ("test", "val"):
        rows = budget_rows(bc, root, pipeline_dirs, split)
        report[split] = {"equal_epochs": claims_per_budget(rows, claims, budgets),
                         "equal_compute": claims_equal_compute(
                             rows, equal_compute_pairs(claims, budgets, minutes), minutes),
                         "against_pixels": against_pixels(rows, bc)}
        if split == "test":
            test_rows = rows
    finetunes = long_finetunes(bc, root)
    monitors = final_monitors(bc, root, pipeline_dirs)
    report.update({"long_finetunes": finetunes, "monitors": monitors})
    test = report["test"]
    stopped = (f"Stopped with {len(left)} job(s) not trained: {', '.join(left)}." if left
               else "Every job of the study is trained.")
    text = [
        "# The budget study (test split)", "",
        f"Runs {', '.join(bc.runs)} pretrained for {', '.join(map(str, budgets))} epochs (the "
        f"{bc.base_epochs}-epoch runs are the pipeline's), seeds {list(bc.seeds)}; the references are "
        "the pipeline's random encoder and raw pixels. CPU-minutes: the budget's steps at the "
        + ("step times of results/cost.json" if cost_json and Path(cost_json).is_file() else
           "step time of the pipeline's seed-0 run") + ". Cells: mean ± 95% CI half-width (n seeds). "
        + stopped, "",
        "## The claims at equal epochs", "", claims_markdown(test["equal_epochs"]),
        "## The claims at about equal compute", "",
        # the table alone: the rule under it is the one printed above
        claims_markdown(test["equal_compute"]).split("\n\n")[0] + "\n" if test["equal_compute"] else
        "No two budgets of the claims' runs cost about the same.\n",
        "## The trend with the budget", "", "At equal epochs, a − b per budget:", "",
        *trend_lines(test["equal_epochs"]), "",
        "## Results per budget", "", results_table(test_rows, bc, minutes),
        "## Against raw pixels", "", *pixels_lines(test["against_pixels"], bc), "",
        f"## Fine-tuning for {bc.long_finetune_epochs} epochs: does it reach {target_top1:.0f}%?", "",
        *(long_finetune_lines(finetunes, target_top1) or ["No long fine-tune trained yet."]), "",
        "## Collapse monitors at the end of pretraining", "",
        "Perplexity: exp(entropy of the batch-mean pseudo label), the number of prototypes in use "
        "(1: one cluster). Information: that entropy minus the mean per-image entropy, in nats "
        "(0 in both collapses, at most log K): how much a pseudo label says about its image. Last "
        "logged step, mean over the seeds trained.", "",
        monitors_table(monitors) if monitors else "No run with pseudo labels trained yet.\n",
    ]
    (out_dir / "budget.md").write_text("\n".join(text))
    (out_dir / "budget.json").write_text(json.dumps(report, indent=2) + "\n")
    budget_figure(test_rows, bc, minutes).savefig(out_dir / "budget.png", dpi=120, bbox_inches="tight")
    with_labels = [r for r in bc.runs if any(m["run"] == r for m in monitors)]
    if with_labels:
        monitors_figure(bc, root, pipeline_dirs, with_labels[-1], bc.seeds[0]).savefig(
            out_dir / "monitors.png", dpi=120, bbox_inches="tight")
    plt.close("all")
    return report
