"""The results tables: every run over its seeds, and the paired differences between runs.

Layout read here (one folder per run and seed):
    results/runs/<run>/seed<s>/pretrain/summary.json   images_per_s, final_loss, collapsed
    results/runs/<run>/seed<s>/evaluate.json           {split: {readout: {knn_top1, linear_top1}}}
    results/runs/<run>/seed<s>/finetune/summary.json   val_top1, test_top1, protocol, ...
    results/runs/<run>/seed<s>/dense.json              {split: {miou, pixel_acc}} (pemae.eval.dense)
Every `seed<s>` folder found is read (not only params.yaml `seeds`): a seed trained later counts.

Steps: `pemae.report.gather.gather` (one row per run, seed and readout), `summarise` (mean ±
sample std over seeds), `paired_differences` (run a minus run b, seed by seed),
`pemae.report.claims.claim_verdicts` (one paired comparison per claim of the paper);
`pemae.report.results_files.write_results` does them all for both splits and writes results.md,
results_val.md and results.json; `pemae.report.claims.write_claims` writes claims.md and
claims.json.

One verdict rule serves every paired comparison (`pemae.report.stats.judge`): the 95% interval of the
mean paired difference from Student's t with n − 1 degrees of freedom. "holds": the whole
interval is above zero (a beats b, the paper's direction); "reversed": wholly below zero;
"inconclusive": it contains zero; "too few seeds": n < 2, no interval at all.
"""

from __future__ import annotations

from pemae.report.gather import PROBE_METRICS, READOUT_NAMES, RUN_METRICS, readout_rank
from pemae.report.stats import HOLDS, REVERSED, ci_text, signed, judge_differences, mean_std


TABLE_METRICS = PROBE_METRICS + RUN_METRICS
PAIRED_METRICS = PROBE_METRICS + ("finetune_top1", "dense_miou")
METRIC_NAMES = {"knn_top1": "k-NN", "linear_top1": "linear", "finetune_top1": "fine-tune",
                "dense_miou": "dense mIoU", "pretrain_images_per_s": "pretrain img/s"}
TABLE_COLUMNS = ["run", "features", "k-NN", "linear", "fine-tune", "dense mIoU", "pretrain img/s",
                 "collapsed"]
PAIRED_COLUMNS = ["a − b", "features", "metric", "mean ± sd", "95% CI", "seeds", "MDE", "verdict"]


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
    return dict(sorted(groups.items(), key=lambda kv: (runs.index(kv[0][0]), readout_rank(kv[0][1]))))


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
    return sorted(readouts, key=readout_rank)


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


def _paired_row(a: str, b: str, readout_a: str | None, readout_b: str | None, metric: str,
                values_a: dict[int, float], values_b: dict[int, float]) -> dict | None:
    seeds = sorted(set(values_a) & set(values_b))
    if not seeds:
        return None
    return {"a": a, "b": b, "readout_a": readout_a, "readout_b": readout_b, "metric": metric,
            "seeds": seeds, **judge_differences([values_a[s] - values_b[s] for s in seeds])}


def paired_differences(rows: list[dict], pairs: list[list[str]],
                       metrics: tuple[str, ...] = PAIRED_METRICS) -> list[dict]:
    """Run a minus run b for each pair [a, b], on the seeds both have, seed by seed.

    Probe metrics are compared per readout both runs have (against the raw-pixel baseline, whose
    only readout is `pixels`, each readout of the other run); run metrics (fine-tune top-1) once
    per pair, with readouts None. Each row: a, b, readout_a, readout_b, metric, seeds and what
    `judge` gives for the differences a − b: mean, sd (sample, ddof 1), n, ci_low, ci_high,
    half_width, mde and verdict ("holds": a better, the whole 95% interval above zero;
    "reversed": b better; "inconclusive"; "too few seeds").
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
# Tables
# --------------------------------------------------------------------------------------------
def format_cell(value) -> str:
    """A table cell: floats with two decimals, missing values as a dash."""
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def mean_std_cell(row: dict, metric: str, usual_n: int | None = None) -> str:
    """`mean ± std` with two decimals, or a dash when no seed has the metric; followed by
    "(n k)" when its number of seeds k is not `usual_n` (the table's; see `seeds_note`)."""
    if f"{metric}_mean" not in row:
        return "–"
    cell = f"{row[f'{metric}_mean']:.2f} ± {row[f'{metric}_std']:.2f}"
    n = row.get(f"{metric}_n")
    return cell if usual_n is None or n == usual_n else f"{cell} (n {n})"


def usual_seed_count(summary_rows: list[dict]) -> int | None:
    """The most common number of seeds behind a figure of the table (None: no figure)."""
    counts = [row[f"{m}_n"] for row in summary_rows for m in TABLE_METRICS if f"{m}_n" in row]
    return max(sorted(set(counts)), key=counts.count) if counts else None


def _finetune_cell(row: dict, usual_n: int | None = None) -> str:
    cell = mean_std_cell(row, "finetune_top1", usual_n)
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

    The per-run cells (fine-tune, pretrain img/s, collapsed) are on each run's first row only. A
    figure over a number of seeds other than the table's usual one says "(n k)".
    """
    cells, seen, n = [], set(), usual_seed_count(summary_rows)
    for row in summary_rows:
        first = row["run"] not in seen
        seen.add(row["run"])
        cells.append({"run": row["run"], "features": READOUT_NAMES.get(row["readout"], format_cell(row["readout"])),
                      "k-NN": mean_std_cell(row, "knn_top1", n), "linear": mean_std_cell(row, "linear_top1", n),
                      "fine-tune": _finetune_cell(row, n) if first else "",
                      "dense mIoU": mean_std_cell(row, "dense_miou", n) if first else "",
                      "pretrain img/s": mean_std_cell(row, "pretrain_images_per_s", n) if first else "",
                      "collapsed": _collapsed_cell(row) if first else ""})
    return cells


def seeds_note(summary_rows: list[dict]) -> str:
    """The line under the table: how many seeds each figure rests on (every seed trained)."""
    n = usual_seed_count(summary_rows)
    counts = {row[f"{m}_n"] for row in summary_rows for m in TABLE_METRICS if f"{m}_n" in row}
    if n is None:
        return "No figures yet."
    if len(counts) == 1:
        return (f"Mean ± sample std over every seed trained: n = {n} seeds for every figure; "
                "top-1 accuracy in %.")
    return (f"Mean ± sample std over every seed trained: n = {n} seeds per figure unless the cell "
            "says (n k); top-1 accuracy in %.")


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


def paired_verdict_text(row: dict) -> str:
    """A paired row's verdict in words: "<a> better" (holds), "<b> better" (reversed),
    "inconclusive" or "too few seeds"."""
    return {HOLDS: f"{row['a']} better", REVERSED: f"{row['b']} better"}.get(row["verdict"], row["verdict"])


def paired_markdown(diff_rows: list[dict]) -> str:
    """The paired differences as a markdown table, with the verdict rule under it."""
    cells = [{"a − b": f"{r['a']} − {r['b']}", "features": _features(r),
              "metric": METRIC_NAMES.get(r["metric"], r["metric"]),
              "mean ± sd": signed(r["mean"]) + ("" if r["sd"] is None else f" ± {r['sd']:.2f}"),
              "95% CI": "–" if r["ci_low"] is None else ci_text(r), "seeds": str(r["n"]),
              "MDE": "–" if r["mde"] is None else f"{r['mde']:.2f}", "verdict": paired_verdict_text(r)}
             for r in diff_rows]
    rule = ("Per-seed differences a − b on every seed both runs have (mean ± sample sd, n seeds) and "
            "their 95% confidence interval, mean ± t(0.975, n − 1)·sd/√n. A run is better only when "
            "the whole interval is on its side of zero; inconclusive when it contains zero; too few "
            "seeds below 2. MDE: the smallest true difference these seeds detect with 80% power, "
            "(t(0.975, n − 1) + t(0.80, n − 1))·sd/√n.")
    return markdown_table(cells, PAIRED_COLUMNS, fmt=str) + "\n" + rule + "\n"
