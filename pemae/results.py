"""The results of every run and seed, gathered from the files the pipeline stages write.

Layout read here (one folder per run and seed):
    results/runs/<run>/seed<s>/pretrain/summary.json   images_per_s, final_loss, collapsed
    results/runs/<run>/seed<s>/evaluate.json           {split: {readout: {knn_top1, linear_top1}}}
    results/runs/<run>/seed<s>/finetune/summary.json   val_top1, test_top1, protocol, ...
    results/runs/<run>/seed<s>/dense.json              {split: {miou, pixel_acc}} (pemae.dense)

Steps: `gather` (one row per run, seed and readout), `summarise` (mean ± sample std over seeds),
`paired_differences` (run a minus run b, seed by seed), `claim_verdicts` (one paired comparison
per claim of the paper, judged holds / does not hold / within noise); `write_results` does them
all for both splits and writes results.md, results_val.md and results.json.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

READOUTS = ("cls", "avg", "pixels")  # table order
READOUT_NAMES = {"cls": "CLS", "avg": "avg patches", "pixels": "raw pixels"}
PROBE_METRICS = ("knn_top1", "linear_top1")  # one value per readout
RUN_METRICS = ("finetune_top1", "dense_miou", "pretrain_images_per_s")  # one value per run and seed
TABLE_METRICS = PROBE_METRICS + RUN_METRICS
PAIRED_METRICS = PROBE_METRICS + ("finetune_top1", "dense_miou")
METRIC_NAMES = {"knn_top1": "k-NN", "linear_top1": "linear", "finetune_top1": "fine-tune",
                "dense_miou": "dense mIoU", "pretrain_images_per_s": "pretrain img/s"}
TABLE_COLUMNS = ["run", "features", "k-NN", "linear", "fine-tune", "dense mIoU", "pretrain img/s",
                 "collapsed"]
PAIRED_COLUMNS = ["a − b", "features", "metric", "difference", "seeds", "verdict"]
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
    readouts = sorted(probes, key=_readout_rank) or [None]
    return [{"run": run, "seed": seed, "readout": r, **probes.get(r, {}), **fields} for r in readouts]


def _readout_rank(readout: str | None) -> int:
    return READOUTS.index(readout) if readout in READOUTS else len(READOUTS)


def gather(results_dir: str | Path, runs: list[str], seeds: list[int], split: str = "test") -> list[dict]:
    """One row per (run, seed, readout) on `split`, in the order of `runs`, `seeds`, READOUTS.

    Keys: run, seed, readout, knn_top1, linear_top1, and on every readout row of a run and seed
    finetune_top1 (the fine-tune summary's `<split>_top1`), finetune_protocol, dense_miou,
    pretrain_images_per_s (None when not pretrained), pretrain_final_loss, collapsed.
    A stage that has not run leaves its keys out; a run and seed without any file gives no row.
    """
    return [row for run in runs for seed in seeds
            for row in _seed_rows(RunPaths(results_dir, run, seed), run, seed, split)]


# --------------------------------------------------------------------------------------------
# Statistics over seeds
# --------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation (ddof 1; 0.0 for a single value) and count."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _values(rows: list[dict], metric: str) -> list[float]:
    return [row[metric] for row in rows if row.get(metric) is not None]


def _groups(rows: list[dict]) -> dict[tuple[str, str | None], list[dict]]:
    """Rows grouped by (run, readout): runs in the order met, readouts in READOUTS order.

    Rows without a readout (a seed not evaluated yet) form a group only in a run without any.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["run"], row["readout"]), []).append(row)
    evaluated = {run for run, readout in groups if readout is not None}
    groups = {k: v for k, v in groups.items() if k[1] is not None or k[0] not in evaluated}
    runs = list(dict.fromkeys(run for run, _ in groups))
    return dict(sorted(groups.items(), key=lambda kv: (runs.index(kv[0][0]), _readout_rank(kv[0][1]))))


def _one_per_seed(rows: list[dict], key: str) -> list:
    """The value of a run-level `key` once per seed (it repeats on every readout row)."""
    return list({row["seed"]: row[key] for row in rows if row.get(key) is not None}.values())


def _summary_row(run: str, readout: str | None, rows: list[dict], run_rows: list[dict],
                 metrics: tuple[str, ...]) -> dict:
    """Probe metrics over `rows` (one readout); run metrics and flags over `run_rows` (all seeds)."""
    flags = _one_per_seed(run_rows, "collapsed")
    summary = {"run": run, "readout": readout, "seeds": sorted({row["seed"] for row in run_rows}),
               "collapsed": any(flags) if flags else None, "collapsed_seeds": sum(flags)}
    protocols = _one_per_seed(run_rows, "finetune_protocol")
    if protocols:
        summary["finetune_protocol"] = protocols[0]
    for metric in metrics:
        values = _one_per_seed(run_rows, metric) if metric in RUN_METRICS else _values(rows, metric)
        if values:
            summary.update({f"{metric}_{k}": v for k, v in mean_std(values).items()})
    return summary


def summarise(rows: list[dict], metrics: tuple[str, ...] = TABLE_METRICS) -> list[dict]:
    """One row per (run, readout): `<metric>_mean`, `<metric>_std` (sample, ddof 1) and `<metric>_n`.

    Run metrics (fine-tune, throughput) are over every seed of the run, the same on each of its
    readout rows. Also: seeds, finetune_protocol, collapsed (True if any seed collapsed, None
    when no seed reports it) and collapsed_seeds (how many did). A metric no seed has is left
    out. Runs keep the order of `rows`; readouts come in the order cls, avg, pixels.
    """
    by_run: dict[str, list[dict]] = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)
    return [_summary_row(run, readout, group, by_run[run], metrics)
            for (run, readout), group in _groups(rows).items()]


# --------------------------------------------------------------------------------------------
# Paired differences between runs, seed by seed
# --------------------------------------------------------------------------------------------
def _per_seed(rows: list[dict], run: str, readout: str | None, metric: str) -> dict[int, float]:
    """{seed: value} of `metric` for one run, on one readout (any readout when None: a run
    metric repeats on every readout row of a seed)."""
    chosen = [row for row in rows if row["run"] == run and readout in (None, row["readout"])]
    return {row["seed"]: row[metric] for row in chosen if row.get(metric) is not None}


def _readouts(rows: list[dict], run: str) -> list[str]:
    readouts = {row["readout"] for row in rows if row["run"] == run and row["readout"]}
    return sorted(readouts, key=_readout_rank)


def _matched_readouts(rows: list[dict], a: str, b: str) -> list[tuple[str, str]]:
    """(readout of a, readout of b): the readouts both runs have; against a run with a single
    readout and none in common (the raw-pixel baseline), each readout of the other run."""
    readouts_a, readouts_b = _readouts(rows, a), _readouts(rows, b)
    common = [r for r in readouts_a if r in readouts_b]
    if common:
        return [(r, r) for r in common]
    if len(readouts_b) == 1:
        return [(r, readouts_b[0]) for r in readouts_a]
    if len(readouts_a) == 1:
        return [(readouts_a[0], r) for r in readouts_b]
    return []


def _verdict(a: str, b: str, diff: dict, noise: float) -> str:
    if diff["n"] < 2 or abs(diff["mean"]) <= noise:
        return "within noise"
    return f"{a} better" if diff["mean"] > 0 else f"{b} better"


def _paired_row(a: str, b: str, readout_a: str | None, readout_b: str | None, metric: str,
                values_a: dict[int, float], values_b: dict[int, float]) -> dict | None:
    seeds = sorted(set(values_a) & set(values_b))
    if not seeds:
        return None
    diff = mean_std([values_a[s] - values_b[s] for s in seeds])
    noise = max(mean_std(list(values_a.values()))["std"], mean_std(list(values_b.values()))["std"])
    return {"a": a, "b": b, "readout_a": readout_a, "readout_b": readout_b, "metric": metric,
            "seeds": seeds, **diff, "noise": noise, "verdict": _verdict(a, b, diff, noise)}


def paired_differences(rows: list[dict], pairs: list[list[str]],
                       metrics: tuple[str, ...] = PAIRED_METRICS) -> list[dict]:
    """Run a minus run b for each pair [a, b], on the seeds both have, seed by seed.

    Probe metrics are compared per readout both runs have (against the raw-pixel baseline, whose
    only readout is `pixels`, each readout of the other run); run metrics (fine-tune top-1) once
    per pair, with readouts None. Each row: a, b, readout_a, readout_b, metric, seeds, mean, std
    (sample, ddof 1), n, noise and verdict.

    Verdict rule: "within noise" when n < 2 or |mean difference| <= noise, where noise is the
    larger of the two runs' own seed-to-seed standard deviations of that metric (over all their
    seeds, as in the summary table); otherwise "<a> better" or "<b> better" by the sign.
    """
    out = []
    for a, b in pairs:
        for metric in metrics:
            matched = [(None, None)] if metric in RUN_METRICS else _matched_readouts(rows, a, b)
            for readout_a, readout_b in matched:
                row = _paired_row(a, b, readout_a, readout_b, metric,
                                  _per_seed(rows, a, readout_a, metric), _per_seed(rows, b, readout_b, metric))
                if row:
                    out.append(row)
    return out


# --------------------------------------------------------------------------------------------
# The paper's claims: one paired comparison each, with a verdict per metric
# --------------------------------------------------------------------------------------------
CLAIM_METRICS = (("cls", "knn_top1"), ("cls", "linear_top1"), (None, "finetune_top1"),
                 (None, "dense_miou"))
CLAIM_COLUMNS = ["claim", "a − b", "k-NN (CLS)", "linear (CLS)", "fine-tune", "dense mIoU"]


def claim_verdict(diff: dict | None) -> str:
    """The paper says a beats b: "holds" (a better beyond noise), "does not hold" (b better
    beyond noise), "within noise", or "not run" (no seed has both runs)."""
    if diff is None:
        return "not run"
    if diff["verdict"] == "within noise":
        return "within noise"
    return "holds" if diff["mean"] > 0 else "does not hold"


def claim_verdicts(rows: list[dict], claims: dict[str, list[str]]) -> list[dict]:
    """For each claim {text: [a, b]} (the paper: a beats b), the paired difference a − b and its
    verdict on each of CLAIM_METRICS (same rule as `paired_differences`).

    Each row: claim, a, b, and per metric "<readout>/<metric>": {mean, std, n, verdict} or
    {verdict: "not run"}.
    """
    out = []
    for claim, (a, b) in claims.items():
        diffs = {(d["readout_a"], d["metric"]): d for d in paired_differences(rows, [[a, b]])}
        row = {"claim": claim, "a": a, "b": b}
        for readout, metric in CLAIM_METRICS:
            diff = diffs.get((readout, metric))
            found = {} if diff is None else {k: diff[k] for k in ("mean", "std", "n")}
            row[f"{readout}/{metric}"] = {**found, "verdict": claim_verdict(diff)}
        out.append(row)
    return out


def claims_markdown(claim_rows: list[dict]) -> str:
    """The verdict per claim and metric as a markdown table, with the rule under it."""
    cells = []
    for row in claim_rows:
        cell = {"claim": row["claim"], "a − b": f"{row['a']} − {row['b']}"}
        for (readout, metric), column in zip(CLAIM_METRICS, CLAIM_COLUMNS[2:]):
            found = row[f"{readout}/{metric}"]
            cell[column] = (found["verdict"] if "mean" not in found else
                            f"{found['mean']:+.2f} ± {found['std']:.2f} ({found['n']}): {found['verdict']}")
        cells.append(cell)
    rule = ("The paper's direction is a > b. Per-seed differences a − b (mean ± sample std, seeds); "
            "holds / does not hold: a / b better by more than the larger of the two runs' seed std; "
            "otherwise within noise. Not run: a run of the claim has no results yet (the ablation "
            "runs of params.yaml `ablations:` are trained by study/dvc.yaml:ablation).")
    return markdown_table(cells, CLAIM_COLUMNS, fmt=str) + "\n" + rule + "\n"


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def format_cell(value) -> str:
    """A table cell: floats with two decimals, missing values as a dash."""
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def mean_std_cell(row: dict, metric: str) -> str:
    """`mean ± std` with two decimals, or a dash when no seed has the metric."""
    if f"{metric}_mean" not in row:
        return "–"
    return f"{row[f'{metric}_mean']:.2f} ± {row[f'{metric}_std']:.2f}"


def _finetune_cell(row: dict) -> str:
    cell = mean_std_cell(row, "finetune_top1")
    scratch = row.get("finetune_protocol", "").startswith("from scratch")
    return cell + " (scratch)" if scratch and cell != "–" else cell


def _collapsed_cell(row: dict) -> str:
    if row.get("collapsed") is None:
        return "–"
    if not row["collapsed"]:
        return "no"
    return f"yes ({row['collapsed_seeds']} of {len(row['seeds'])} seeds)"


def table_cells(summary_rows: list[dict]) -> list[dict]:
    """The long results table as text cells keyed by TABLE_COLUMNS, one row per run and readout.

    The per-run cells (fine-tune, pretrain img/s, collapsed) are on each run's first row only.
    """
    cells, seen = [], set()
    for row in summary_rows:
        first = row["run"] not in seen
        seen.add(row["run"])
        cells.append({"run": row["run"], "features": READOUT_NAMES.get(row["readout"], format_cell(row["readout"])),
                      "k-NN": mean_std_cell(row, "knn_top1"), "linear": mean_std_cell(row, "linear_top1"),
                      "fine-tune": _finetune_cell(row) if first else "",
                      "dense mIoU": mean_std_cell(row, "dense_miou") if first else "",
                      "pretrain img/s": mean_std_cell(row, "pretrain_images_per_s") if first else "",
                      "collapsed": _collapsed_cell(row) if first else ""})
    return cells


def seeds_note(summary_rows: list[dict]) -> str:
    """The line under the table: how many seeds each mean is over."""
    counts = {row["run"]: len(row["seeds"]) for row in summary_rows}
    if len(set(counts.values())) == 1:
        return f"Mean ± sample std over n = {next(iter(counts.values()))} seeds; top-1 accuracy in %."
    per_run = ", ".join(f"{run} {n}" for run, n in counts.items())
    return f"Mean ± sample std over seeds (n per run: {per_run}); top-1 accuracy in %."


def markdown_table(rows: list[dict], columns: list[str], fmt=format_cell) -> str:
    """A GitHub markdown table of `rows`, each cell written by `fmt`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_markdown(summary_rows: list[dict]) -> str:
    """The long results table (mean ± std per run and readout) and the number of seeds under it."""
    return markdown_table(table_cells(summary_rows), TABLE_COLUMNS, fmt=str) + "\n" + seeds_note(summary_rows) + "\n"


def _features(row: dict) -> str:
    if row["readout_a"] is None:
        return "–"
    name_a, name_b = READOUT_NAMES.get(row["readout_a"]), READOUT_NAMES.get(row["readout_b"])
    return name_a if name_a == name_b else f"{name_a} vs {name_b}"


def paired_markdown(diff_rows: list[dict]) -> str:
    """The paired differences as a markdown table, with the verdict rule under it."""
    cells = [{"a − b": f"{r['a']} − {r['b']}", "features": _features(r),
              "metric": METRIC_NAMES.get(r["metric"], r["metric"]),
              "difference": f"{r['mean']:+.2f} ± {r['std']:.2f}", "seeds": str(r["n"]), "verdict": r["verdict"]}
             for r in diff_rows]
    rule = ("Per-seed differences on the seeds both runs have (mean ± sample std). Within noise: "
            "fewer than 2 seeds, or |mean| no larger than the larger of the two runs' seed std.")
    return markdown_table(cells, PAIRED_COLUMNS, fmt=str) + "\n" + rule + "\n"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def split_results(results_dir: str | Path, runs: list[str], seeds: list[int], pairs: list[list[str]],
                  split: str, claims: dict[str, list[str]] | None = None) -> dict[str, list[dict]]:
    """{"seeds": per-seed rows, "summary": mean ± std rows, "paired": paired differences,
    "claims": verdicts per claim} on `split`."""
    rows = gather(results_dir, runs, seeds, split)
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


def write_results(results_dir: str | Path, runs: list[str], seeds: list[int], pairs: list[list[str]],
                  claims: dict[str, list[str]] | None = None) -> dict[str, dict[str, list[dict]]]:
    """Write results.md (test split), results_val.md (validation split) and results.json.

    `claims` {text: [a, b]}: the paper's claims, each judged a − b (the caller passes those whose
    runs are among `runs`, as for `pairs`). Returns {split: {"seeds", "summary", "paired",
    "claims"}} for both splits, for the figures.
    """
    results_dir = Path(results_dir)
    results = {split: split_results(results_dir, runs, seeds, pairs, split, claims) for split in SPLITS}
    (results_dir / "results.md").write_text(report_markdown(results["test"], "test"))
    (results_dir / "results_val.md").write_text(report_markdown(results["val"], "validation"))
    metrics = {split: keyed_rows(parts) for split, parts in results.items()}
    (results_dir / "results.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return results


def write_claims(out_dir: str | Path, results_dirs: list[str | Path], seeds: list[int],
                 claims: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Judge every claim on the runs found under any of `results_dirs` (the pipeline's runs, the
    ablation runs of study/dvc.yaml; a run found in an earlier folder wins) and write claims.md
    (both splits) and claims.json into `out_dir`. Returns {split: claim rows}."""
    found: dict[str, Path] = {}
    for folder in results_dirs:
        for run in run_names(folder):
            found.setdefault(run, Path(folder))
    verdicts = {}
    for split in SPLITS:
        rows = [row for run, folder in found.items() for row in gather(folder, [run], seeds, split)]
        verdicts[split] = claim_verdicts(rows, claims)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "claims.md").write_text("".join(
        f"## The paper's claims ({name} split)\n\n" + claims_markdown(verdicts[split]) + "\n"
        for split, name in (("test", "test"), ("val", "validation"))))
    keyed = {split: {f"{r['a']}-{r['b']}": r for r in rows} for split, rows in verdicts.items()}
    (out_dir / "claims.json").write_text(json.dumps(keyed, indent=2) + "\n")
    return verdicts
