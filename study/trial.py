"""One trial of a search on the validation split, appended as a JSON line to a log.

    python study/trial.py pretrain RUN OUT [section.key=value ...]        # a pretraining variant
    python study/trial.py finetune ENCODER OUT [section.key=value ...]     # fine-tuning recipe
    python study/trial.py small_data RUN OUT [section.key=value ...]      # digits, one run

`pretrain` pretrains one run of params.yaml (e.g. pemae) with the overrides on the default data
and probes its encoder (k-NN and linear, CLS and average readouts), keeping the run's cost and
its last collapse monitors (pseudo-label entropy as a fraction of log K: 1 is uniform);
`finetune` fine-tunes an exported encoder (e.g. results/runs/mae/seed0/pretrain/encoder.pt) with
params.yaml's `mae` run config plus the overrides; `small_data` pretrains, evaluates and
fine-tunes one run of params.yaml on scikit-learn's digits as the small_data stage does (32 px,
40 pretraining and 20 fine-tuning epochs unless overridden). All score the validation split
only — the test split is never read — and append {"trial", "sets", figures, "seconds"} to
results/search/<kind>.jsonl (`--log` to change it), rewriting the table of all its trials beside
it (<kind>.md).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from pemae.cli import parse_sets
from pemae.config.params import deep_merge, flatten, load_params
from pemae.eval.probes import evaluate_encoder
from pemae.engine.finetune import finetune
from pemae.engine.pretrain import pretrain
from pemae.engine.runtime import read_log
from pemae.studies.small_data import digits_overrides, write_digits_imagefolder

DIGITS = {"img_size": 32, "pretrain_epochs": 40, "finetune_epochs": 20}


def label_monitors(out_dir: Path, num_prototypes: int) -> dict:
    """The last logged pseudo-label monitors: entropy as a fraction of log K, perplexity, and
    the image-label information (from the two, so that logs without the column give it too)."""
    log = read_log(out_dir / "log.csv")
    found = {}
    for kind in ("cls", "tok"):
        if f"{kind}_entropy" in log:
            found[f"{kind}_entropy_frac"] = round(float(log[f"{kind}_entropy"][-1]) / math.log(num_prototypes), 3)
            found[f"{kind}_perplexity"] = round(float(log[f"{kind}_perplexity"][-1]), 1)
            perplexity, ent = float(log[f"{kind}_perplexity"][-1]), float(log[f"{kind}_entropy"][-1])
            found[f"{kind}_information"] = round(math.log(perplexity) - ent, 3)  # nats (model.py)
    return found


def pretrain_trial(run: str, out: Path, sets: list[str]) -> dict:
    cfg = load_params("params.yaml", run, parse_sets(sets))
    _, summary = pretrain(cfg, out / "pretrain", progress=False)
    probes = evaluate_encoder(cfg, out / "pretrain" / "encoder.pt", progress=False)["val"]
    return {"run": run, "val": probes, "pretrain_seconds": summary["seconds"],
            "images_per_s": summary["images_per_s"], "collapsed": summary.get("collapsed", False),
            **label_monitors(out / "pretrain", cfg.method.num_prototypes)}


def finetune_trial(encoder: str, out: Path, sets: list[str]) -> dict:
    cfg = load_params("params.yaml", "mae", parse_sets(sets))
    summary = finetune(cfg, Path(encoder), out, progress=False, test=False)
    return {"encoder": encoder, "val_top1": summary["val_top1"]}


def small_data_trial(run: str, out: Path, sets: list[str]) -> dict:
    root = write_digits_imagefolder(Path.home() / ".cache" / "pemae" / "digits")
    pretrained = load_params("params.yaml", run).pretrain.epochs > 0
    digits = digits_overrides(root, **DIGITS, pretrained=pretrained)
    cfg = load_params("params.yaml", run, deep_merge(digits, parse_sets(sets)))
    pretrain(cfg, out / "pretrain", progress=False)
    probes = evaluate_encoder(cfg, out / "pretrain" / "encoder.pt", progress=False)["val"]
    tuned = finetune(cfg, out / "pretrain" / "encoder.pt", out / "finetune", progress=False, test=False)
    return {"run": run, "val": probes, "finetune_val_top1": tuned["val_top1"],
            **label_monitors(out / "pretrain", cfg.method.num_prototypes)}


TRIALS = {"pretrain": pretrain_trial, "finetune": finetune_trial, "small_data": small_data_trial}


def write_table(log: Path) -> Path:
    """The trials of a search log as a markdown table beside it (<log>.md), in the order tried:
    the overrides, then every figure the trials recorded (a dash where a trial has none)."""
    records = [flatten(json.loads(line)) for line in log.read_text().splitlines() if line.strip()]
    columns = [c for c in dict.fromkeys(k for r in records for k in r) if c not in ("trial", "sets")]
    lines = ["| # | overrides | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for i, r in enumerate(records, 1):
        sets = ", ".join(f"`{s}`" for s in r.get("sets", [])) or "(defaults)"
        lines.append(f"| {i} | {sets} | " + " | ".join(str(r.get(c, "–")) for c in columns) + " |")
    table = log.with_suffix(".md")
    table.write_text(f"Trials of `python study/trial.py {records[0].get('trial', '')}` "
                     "(validation split only), in the order they were run; written from "
                     f"{log.name}.\n\n" + "\n".join(lines) + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=list(TRIALS))
    parser.add_argument("subject", help="the encoder (finetune) or the run (pretrain, small_data)")
    parser.add_argument("out", type=Path, help="scratch folder for the trial's files")
    parser.add_argument("sets", nargs="*", metavar="SECTION.KEY=VALUE")
    parser.add_argument("--log", type=Path, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    figures = TRIALS[args.kind](args.subject, args.out, args.sets)
    record = {"trial": args.kind, "sets": args.sets, **figures,
              "seconds": round(time.perf_counter() - start, 1)}
    log = args.log or Path("results/search") / f"{args.kind}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(json.dumps(record) + "\n")
    write_table(log)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
