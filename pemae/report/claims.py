"""The paper's claims (params.yaml `claims:`) judged from the per-seed results: one cell per claim
and metric under the verdict rule, `claims.md` / `claims.json`, and README.md's claims block
(`python -m pemae.results --readme`)."""

from __future__ import annotations

import json
from pathlib import Path

from pemae.report.gather import SPLITS, gather_folders
from pemae.report.stats import (DECIDED, INCONCLUSIVE, NOT_RUN, NO_VERDICT, STOP_HALF_WIDTH,
                                STOP_SEEDS, ci_text, signed, seeds_needed)
from pemae.report.tables import markdown_table, paired_differences


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


def claim_cell_text(cell: dict) -> str:
    """A claims.md cell in words: mean (sd, n), the 95% interval and the verdict; an inconclusive
    cell adds the smallest difference its seeds could detect (the MDE)."""
    verdict = cell["verdict"]
    if verdict == NOT_RUN:
        return NOT_RUN
    if verdict == NO_VERDICT:
        return f"{signed(cell['mean'])} (n {cell['n']}): no verdict, {NO_VERDICT}"
    text = f"{signed(cell['mean'])} (sd {cell['sd']:.2f}, n {cell['n']}), CI {ci_text(cell)}: "
    if verdict == INCONCLUSIVE:
        return text + f"inconclusive, could detect ≥ {cell['mde']:.2f} points"
    return text + f"**{verdict}**"


def _stopping_text(row: dict) -> str:
    names = {"cls/linear_top1": "linear", "None/finetune_top1": "fine-tune"}
    cells = {names[key]: row[key] for key in STOPPING_CELLS}
    if any(cell["verdict"] == NOT_RUN for cell in cells.values()):
        return NOT_RUN
    if row["seeds_enough"]:  # the half-width of each cell, and whether the seed cap rather than it met the rule
        met = [f"{name} ± {cell['half_width']:.2f}" + ("" if cell["half_width"] <= STOP_HALF_WIDTH
                                                       else f" at the {STOP_SEEDS}-seed cap")
               for name, cell in cells.items()]
        return "yes (" + "; ".join(met) + ")"
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
        "seeds; yes gives each half-width, and says where the seed cap met the rule rather than the "
        "half-width; no, the half-width now and the seeds the current sd says it needs.")
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
    detect, then on a line of their own the cells with no verdict (not run, too few seeds).
    Generated, so that the README never says more than claims.json."""
    if not isinstance(claims_json, dict):
        claims_json = json.loads(Path(claims_json).read_text())
    decided, undecided, unjudged = [], [], {}
    for row in claims_json[split].values():
        open_cells = []
        for key, column in CLAIM_CELLS.items():
            cell = row[key]
            if cell["verdict"] in DECIDED:
                decided.append(f'- **Decided:** "{row["claim"]}" on {column}: **{cell["verdict"]}**, '
                               f"{signed(cell['mean'])} points (95% CI {ci_text(cell)}, "
                               f"{cell['n']} seeds).")
            elif cell["verdict"] == INCONCLUSIVE:
                open_cells.append(f"{column} ≥ {cell['mde']:.2f} (n {cell['n']})")
            else:  # not run, or too few seeds: no verdict either way
                unjudged.setdefault((column, cell["verdict"]), []).append(f'"{row["claim"]}"')
        if open_cells:
            undecided.append(f'  - "{row["claim"]}": ' + ", ".join(open_cells))
    lines = decided or ["- **Decided:** none."]
    if undecided:
        lines += ["- **Inconclusive** (the 95% CI contains 0), with the smallest difference these "
                  "seeds could detect:", *undecided]
    lines += [f"- **No verdict** ({verdict}) on {column}: " + ", ".join(claims) + "."
              for (column, verdict), claims in unjudged.items()]
    return "\n".join([README_BEGIN, *lines, README_END])


def update_readme(readme: str | Path = "README.md", claims: str | Path = "results/claims.json") -> bool:
    """Rewrite the README's claims block from claims.json; True when it changed."""
    path = Path(readme)
    text = path.read_text()
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    new = text[:start] + readme_claims(claims) + text[end:]
    path.write_text(new)
    return new != text


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
