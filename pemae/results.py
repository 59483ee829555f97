"""The results of every run and seed, gathered from the files the pipeline stages write.

Layout read here (one folder per run and seed):
    results/runs/<run>/seed<s>/pretrain/summary.json   images_per_s, final_loss, collapsed
    results/runs/<run>/seed<s>/evaluate.json           {split: {readout: {knn_top1, linear_top1}}}
    results/runs/<run>/seed<s>/finetune/summary.json   val_top1, test_top1, protocol, ...
    results/runs/<run>/seed<s>/dense.json              {split: {miou, pixel_acc}} (pemae.dense)
Every `seed<s>` folder found is read (not only params.yaml `seeds`): a seed trained later counts.

Steps: `gather` (one row per run, seed and readout), `summarise` (mean ± sample std over seeds),
`paired_differences` (run a minus run b, seed by seed), `claim_verdicts` (one paired comparison
per claim of the paper); `write_results` does them all for both splits and writes results.md,
results_val.md and results.json; `write_claims` writes claims.md and claims.json.

One verdict rule serves every paired comparison (`judge`): the 95% confidence interval of the
mean paired difference from Student's t with n − 1 degrees of freedom. "holds": the whole
interval is above zero (a beats b, the paper's direction); "reversed": wholly below zero;
"inconclusive": it contains zero; "too few seeds": n < 2, no interval at all.
"""

from __future__ import annotations

import functools
import json
import math
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
PAIRED_COLUMNS = ["a − b", "features", "metric", "mean ± sd", "95% CI", "seeds", "MDE", "verdict"]
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
    readouts = sorted(probes, key=_readout_rank) or [None]
    return [{"run": run, "seed": seed, "readout": r, **probes.get(r, {}), **fields} for r in readouts]


def _readout_rank(readout: str | None) -> int:
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


# --------------------------------------------------------------------------------------------
# Statistics over seeds
# --------------------------------------------------------------------------------------------
CONFIDENCE = 0.95     # two-sided: the interval every verdict is read from
POWER = 0.80          # of the minimum detectable effect
STOP_HALF_WIDTH = 0.5  # points: the stopping rule for adding seeds (CLS linear and fine-tune) ...
STOP_SEEDS = 10        # ... or this many seeds, whichever comes first
HOLDS, REVERSED, INCONCLUSIVE, NO_VERDICT, NOT_RUN = (
    "holds", "reversed", "inconclusive", "too few seeds", "not run")
DECIDED = (HOLDS, REVERSED)


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The p quantile of Student's t with `df` degrees of freedom (scipy.stats when installed;
    scikit-learn, in the `pipeline` extra, brings it)."""
    try:
        from scipy import stats
    except ImportError:  # the core install has no scipy
        return _t_quantile_fallback(p, df)
    return float(stats.t.ppf(p, df))


def _t_pdf(x: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf(x: float, df: int, intervals: int = 2000) -> float:
    """P(T <= x) for x >= 0: one half plus Simpson's rule on the density over [0, x]."""
    h = x / intervals
    inner = sum((4 if i % 2 else 2) * _t_pdf(i * h, df) for i in range(1, intervals))
    return 0.5 + h / 3 * (_t_pdf(0.0, df) + inner + _t_pdf(x, df))


def _t_quantile_fallback(p: float, df: int) -> float:
    """Without scipy: bisection on the integrated density (df <= 30), the Cornish-Fisher
    expansion around the normal quantile above (error < 1e-4 there)."""
    if p < 0.5:
        return -_t_quantile_fallback(1 - p, df)
    if df > 30:
        z = statistics.NormalDist().inv_cdf(p)
        return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
                + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def judge(mean: float, sd: float | None, n: int) -> dict:
    """The verdict rule, from the mean, sample sd and number n of the paired differences a − b
    (the paper: a beats b). Returns mean, sd, n and

    ci_low, ci_high: mean ∓ t(0.975, n − 1)·sd/√n, the 95% confidence interval;
    half_width:      t(0.975, n − 1)·sd/√n;
    mde:             (t(0.975, n − 1) + t(0.80, n − 1))·sd/√n, the smallest true difference these
                     seeds detect with 80% power at two-sided 5%;
    verdict:         "holds" (ci_low > 0), "reversed" (ci_high < 0), "inconclusive" (the interval
                     contains zero) or "too few seeds" (n < 2: no spread, no interval; the others
                     are then None).
    """
    if n < 2 or sd is None:
        return {"mean": mean, "sd": None, "n": n, "ci_low": None, "ci_high": None,
                "half_width": None, "mde": None, "verdict": NO_VERDICT}
    se = sd / math.sqrt(n)
    t_ci = t_quantile(1 - (1 - CONFIDENCE) / 2, n - 1)
    half = t_ci * se
    low, high = mean - half, mean + half
    verdict = HOLDS if low > 0 else REVERSED if high < 0 else INCONCLUSIVE
    return {"mean": mean, "sd": sd, "n": n, "ci_low": low, "ci_high": high, "half_width": half,
            "mde": (t_ci + t_quantile(POWER, n - 1)) * se, "verdict": verdict}


def judge_differences(differences: list[float]) -> dict:
    """`judge` on paired differences a − b (one per seed)."""
    n = len(differences)
    return judge(statistics.fmean(differences), statistics.stdev(differences) if n > 1 else None, n)


def ci_half_width(sd: float, n: int) -> float | None:
    """Half the 95% t interval of a mean over n seeds (None for a single seed)."""
    return t_quantile(1 - (1 - CONFIDENCE) / 2, n - 1) * sd / math.sqrt(n) if n > 1 else None


def seeds_needed(sd: float | None, half_width: float = STOP_HALF_WIDTH, most: int = 1000) -> int | None:
    """The smallest n with t(0.975, n − 1)·sd/√n <= half_width, estimated from the current sd
    (None without one; `most` + 1 when even `most` seeds are not enough)."""
    if sd is None:
        return None
    return next((n for n in range(2, most + 1) if ci_half_width(sd, n) <= half_width), most + 1)


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation (ddof 1; 0.0 for a single value), count, and the half-width
    of the mean's 95% t interval (ci95; None for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values),
            "ci95": ci_half_width(std, len(values))}


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
# The paper's claims: one paired comparison each, with a verdict per metric
# --------------------------------------------------------------------------------------------
CLAIM_METRICS = (("cls", "knn_top1"), ("cls", "linear_top1"), (None, "finetune_top1"),
                 (None, "dense_miou"))
CLAIM_COLUMNS = ["claim", "a − b", "k-NN (CLS)", "linear (CLS)", "fine-tune", "dense mIoU",
                 "seeds enough?"]
CLAIM_CELLS = {f"{readout}/{metric}": column for (readout, metric), column
               in zip(CLAIM_METRICS, CLAIM_COLUMNS[2:])}  # claims.json key: its column in claims.md
STOPPING_CELLS = ("cls/linear_top1", "None/finetune_top1")  # the stopping rule for adding seeds
CELL_KEYS = ("mean", "sd", "n", "seeds", "ci_low", "ci_high", "half_width", "mde", "verdict")


def claim_cell(diff: dict | None) -> dict:
    """One claim and metric: `judge`'s figures and verdict on the paired differences a − b, and
    seeds_needed (for a 95% half-width of STOP_HALF_WIDTH points, from the current sd); only
    {"verdict": "not run"} when no seed has both runs."""
    if diff is None:
        return {"verdict": NOT_RUN}
    return {**{k: diff[k] for k in CELL_KEYS}, "seeds_needed": seeds_needed(diff["sd"])}


def seeds_enough(cell: dict) -> bool | None:
    """The stopping rule for adding seeds: a 95% half-width <= STOP_HALF_WIDTH points, or
    STOP_SEEDS seeds (None: not run; a single seed, without a half-width, is not enough)."""
    if cell["verdict"] == NOT_RUN:
        return None
    return cell["n"] >= STOP_SEEDS or (cell["half_width"] is not None
                                       and cell["half_width"] <= STOP_HALF_WIDTH)


def claim_verdicts(rows: list[dict], claims: dict[str, list[str]]) -> list[dict]:
    """For each claim {text: [a, b]} (the paper: a beats b), the paired difference a − b and its
    verdict on each of CLAIM_METRICS (`judge`, the rule of `paired_differences`).

    Each row: claim, a, b, per metric "<readout>/<metric>": `claim_cell` ({mean, sd, n, seeds,
    ci_low, ci_high, half_width, mde, verdict, seeds_needed} or {verdict: "not run"}), and
    seeds_enough: the stopping rule met on both STOPPING_CELLS (None while one is not run).
    """
    out = []
    for claim, (a, b) in claims.items():
        diffs = {(d["readout_a"], d["metric"]): d for d in paired_differences(rows, [[a, b]])}
        row = {"claim": claim, "a": a, "b": b}
        for readout, metric in CLAIM_METRICS:
            row[f"{readout}/{metric}"] = claim_cell(diffs.get((readout, metric)))
        enough = [seeds_enough(row[key]) for key in STOPPING_CELLS]
        row["seeds_enough"] = None if None in enough else all(enough)
        out.append(row)
    return out


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def _ci_text(cell: dict) -> str:
    return f"[{_signed(cell['ci_low'])}, {_signed(cell['ci_high'])}]"


def claim_cell_text(cell: dict) -> str:
    """A claims.md cell in words: mean (sd, n), the 95% interval and the verdict; an inconclusive
    cell adds the smallest difference its seeds could detect (the MDE)."""
    verdict = cell["verdict"]
    if verdict == NOT_RUN:
        return NOT_RUN
    if verdict == NO_VERDICT:
        return f"{_signed(cell['mean'])} (n {cell['n']}): no verdict, {NO_VERDICT}"
    text = f"{_signed(cell['mean'])} (sd {cell['sd']:.2f}, n {cell['n']}), CI {_ci_text(cell)}: "
    if verdict == INCONCLUSIVE:
        return text + f"inconclusive, could detect ≥ {cell['mde']:.2f} points"
    return text + f"**{verdict}**"


def _stopping_text(row: dict) -> str:
    names = {"cls/linear_top1": "linear", "None/finetune_top1": "fine-tune"}
    cells = {names[key]: row[key] for key in STOPPING_CELLS}
    if any(cell["verdict"] == NOT_RUN for cell in cells.values()):
        return NOT_RUN
    if row["seeds_enough"]:
        return "yes"
    short = [f"{name} ± {cell['half_width']:.2f}, ~{cell['seeds_needed']} seeds" if cell["half_width"] is not None
             else f"{name}: one seed" for name, cell in cells.items() if not seeds_enough(cell)]
    return "no (" + "; ".join(short) + ")"


def claims_markdown(claim_rows: list[dict]) -> str:
    """The verdict per claim and metric as a markdown table, with the rule under it."""
    cells = []
    for row in claim_rows:
        cell = {"claim": row["claim"], "a − b": f"{row['a']} − {row['b']}",
                "seeds enough?": _stopping_text(row)}
        for key, column in CLAIM_CELLS.items():
            cell[column] = claim_cell_text(row[key])
        cells.append(cell)
    rule = (
        "The paper's direction is a > b. Each cell: the mean of the per-seed differences a − b "
        "(sample sd, n seeds: every seed trained for both runs) and its 95% confidence interval, "
        "mean ± t(0.975, n − 1)·sd/√n. **holds**: the whole interval is above zero; **reversed**: "
        "wholly below zero (b beats a); inconclusive: it contains zero, and the cell gives the "
        "minimum detectable effect, (t(0.975, n − 1) + t(0.80, n − 1))·sd/√n, the smallest true "
        "difference these seeds would find with 80% power; too few seeds: n < 2. Not run: a run of "
        "the claim has no results yet (the ablation runs of params.yaml `ablations:` are trained by "
        f"study/dvc.yaml:ablation). Seeds enough?: the stopping rule for adding seeds, a 95% "
        f"half-width ≤ {STOP_HALF_WIDTH} points on both CLS linear and fine-tune, or {STOP_SEEDS} "
        "seeds; otherwise the half-width now and the seeds the current sd says it needs.")
    return markdown_table(cells, CLAIM_COLUMNS, fmt=str) + "\n" + rule + "\n"


def decided_comparisons(claims_json: dict | str | Path, split: str = "test") -> dict[tuple[str, str], str]:
    """{(claim, cell key): verdict} for every claim and metric of a claims.json (a path or its
    loaded dict) that the rule decided ("holds" or "reversed") on `split`; a cell missing here is
    inconclusive, too few seeds or not run, and no text may call it decided. Cell keys are
    claims.json's ("cls/knn_top1", "cls/linear_top1", "None/finetune_top1", "None/dense_miou";
    CLAIM_CELLS names their columns)."""
    if not isinstance(claims_json, dict):
        claims_json = json.loads(Path(claims_json).read_text())
    return {(row["claim"], key): row[key]["verdict"] for row in claims_json[split].values()
            for key in CLAIM_CELLS if row[key]["verdict"] in DECIDED}


README_BEGIN, README_END = "<!-- claims: begin (python -m pemae.results --readme) -->", "<!-- claims: end -->"


def readme_claims(claims_json: dict | str | Path, split: str = "test") -> str:
    """The README's summary of the claims, in the table's words: each decided cell with its mean
    and interval, then per claim the inconclusive cells with the smallest effect their seeds could
    detect, and what is not run. Generated, so that the README never says more than claims.json."""
    if not isinstance(claims_json, dict):
        claims_json = json.loads(Path(claims_json).read_text())
    decided, undecided = [], []
    for row in claims_json[split].values():
        open_cells, not_run = [], []
        for key, column in CLAIM_CELLS.items():
            cell = row[key]
            if cell["verdict"] in DECIDED:
                decided.append(f'- **Decided:** "{row["claim"]}" on {column}: **{cell["verdict"]}**, '
                               f"{_signed(cell['mean'])} points (95% CI {_ci_text(cell)}, "
                               f"{cell['n']} seeds).")
            elif cell["verdict"] == INCONCLUSIVE:
                open_cells.append(f"{column} ≥ {cell['mde']:.2f} (n {cell['n']})")
            else:
                not_run.append(f"{column} {cell['verdict']}")
        if open_cells or not_run:
            undecided.append(f'  - "{row["claim"]}": ' + ", ".join(open_cells + not_run))
    lines = decided or ["- **Decided:** none."]
    if undecided:
        lines += ["- **Inconclusive** (the 95% CI contains 0), with the smallest difference these "
                  "seeds could detect:", *undecided]
    return "\n".join([README_BEGIN, *lines, README_END])


def update_readme(readme: str | Path = "README.md", claims: str | Path = "results/claims.json") -> bool:
    """Rewrite the README's claims block from claims.json; True when it changed."""
    path = Path(readme)
    text = path.read_text()
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    new = text[:start] + readme_claims(claims) + text[end:]
    path.write_text(new)
    return new != text


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
              "mean ± sd": _signed(r["mean"]) + ("" if r["sd"] is None else f" ± {r['sd']:.2f}"),
              "95% CI": "–" if r["ci_low"] is None else _ci_text(r), "seeds": str(r["n"]),
              "MDE": "–" if r["mde"] is None else f"{r['mde']:.2f}", "verdict": paired_verdict_text(r)}
             for r in diff_rows]
    rule = ("Per-seed differences a − b on every seed both runs have (mean ± sample sd, n seeds) and "
            "their 95% confidence interval, mean ± t(0.975, n − 1)·sd/√n. A run is better only when "
            "the whole interval is on its side of zero; inconclusive when it contains zero; too few "
            "seeds below 2. MDE: the smallest true difference these seeds detect with 80% power, "
            "(t(0.975, n − 1) + t(0.80, n − 1))·sd/√n.")
    return markdown_table(cells, PAIRED_COLUMNS, fmt=str) + "\n" + rule + "\n"


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
    return sorted(rows, key=lambda r: (runs.index(r["run"]), r["seed"], _readout_rank(r["readout"])))


def judge_claims(results_dirs: list[str | Path], claims: dict[str, list[str]]) -> dict[str, list[dict]]:
    """{split: `claim_verdicts` rows} on every seed of every run trained under any of
    `results_dirs` (`gather_folders`)."""
    return {split: claim_verdicts(gather_folders(results_dirs, split), claims) for split in SPLITS}


def write_claims(out_dir: str | Path, results_dirs: list[str | Path], claims: dict[str, list[str]]
                 ) -> dict[str, list[dict]]:
    """`judge_claims` and write claims.md (both splits) and claims.json into `out_dir`.
    Returns {split: claim rows}."""
    verdicts = judge_claims(results_dirs, claims)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "claims.md").write_text("".join(
        f"## The paper's claims ({name} split)\n\n" + claims_markdown(verdicts[split]) + "\n"
        for split, name in (("test", "test"), ("val", "validation"))))
    keyed = {split: {f"{r['a']}-{r['b']}": r for r in rows} for split, rows in verdicts.items()}
    (out_dir / "claims.json").write_text(json.dumps(keyed, indent=2) + "\n")
    return verdicts


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--readme"]:
        raise SystemExit("usage: python -m pemae.results --readme   (rewrite README.md's claims block)")
    print("README.md " + ("updated" if update_readme() else "already matches results/claims.json"))
