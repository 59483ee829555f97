"""A small data set the defaults were not tuned on, and the check that pretraining helps there.

scikit-learn ships the UCI handwritten digits (1,797 grayscale images, 8 x 8 pixels, 16 grey
levels, 10 classes; Alpaydin & Kaynak 1998) inside the package, so they need no download. They are
written out as an `imagefolder` (`train/<class>/*.png`, `val/<class>/*.png` as the test split) and
go through exactly the code path a user's own image folder takes: any size (`data.img_size`
resamples them), grayscale, a few hundred images per class.

The check (`check_not_worse_than_random`, over `small_data.seeds`): no pretrained run's k-NN,
linear-probe or fine-tuning accuracy may fall below the randomly initialised encoder's, by the
verdict rule of the claims (`pemae.report.stats.judge`): paired seed by seed, a figure fails only when
the 95% confidence interval of its difference to the random encoder lies wholly below zero
("reversed"). With a single seed there is no interval and so no verdict: such a figure is
reported as undecided (`undecided_against_random`), never as a failure, whatever its sign.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pemae.report.results_files import keyed_rows, report_markdown, split_results
from pemae.report.stats import NO_VERDICT, REVERSED


DIGIT_LEVELS = 16  # the digits' pixels are counts 0..16 of a 4 x 4 block of a 32 x 32 bitmap


def write_digits_imagefolder(root: str | Path, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's digits as PNGs under `root/train/<digit>/` and `root/val/<digit>/`
    (`test_fraction` of them, drawn by `seed`); idempotent: an existing complete folder is kept."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    images = np.clip(digits.images * (255.0 / DIGIT_LEVELS), 0, 255).round().astype(np.uint8)  # [N, 8, 8]
    n = len(images)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = round(test_fraction * n)
    split_of = {i: "val" if rank < n_test else "train" for rank, i in enumerate(order)}
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{n} {test_fraction} {seed}":
        return root
    for i in range(n):
        folder = root / split_of[i] / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
    done.write_text(f"{n} {test_fraction} {seed}")
    return root


def digits_overrides(root: str | Path, img_size: int, pretrain_epochs: int, finetune_epochs: int,
                     pretrained: bool) -> dict:
    """The config overrides that move a run onto the digits folder at `root`: only the data and
    the epoch counts change; an unpretrained run (`pretrained` False) keeps its 0 epochs."""
    overrides = {"data": {"dataset": "imagefolder", "root": str(root), "img_size": img_size,
                          "in_chans": 1, "train_subset": 0, "test_subset": 0},
                 "finetune": {"epochs": finetune_epochs, "train_subset": 0}}
    if pretrained:
        overrides["pretrain"] = {"epochs": pretrain_epochs}
    return overrides


def check_not_worse_than_random(paired_rows: list[dict]) -> list[str]:
    """The paired differences (`pemae.report.tables.paired_differences`, pretrained run − random
    encoder, seed by seed) where pretraining made a figure worse: [] = passed.

    Worse is the claims' rule: the verdict "reversed", the whole 95% t interval of the mean
    difference below zero. An interval that contains zero is inconclusive, not a failure; a
    single seed gives no verdict (see `undecided_against_random`).
    """
    return [f"{row['a']}: {_figure(row)} {row['mean']:+.2f} ± {row['sd']:.2f} against {row['b']} "
            f"over {row['n']} seeds, 95% CI [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"
            for row in paired_rows if row["verdict"] == REVERSED]


def undecided_against_random(paired_rows: list[dict]) -> list[str]:
    """The paired differences with too few seeds (one) for any verdict: neither passed nor
    failed, whatever the sign of the difference."""
    return [f"{row['a']}: {_figure(row)} {row['mean']:+.2f} against {row['b']} over {row['n']} seed: "
            "no verdict" for row in paired_rows if row["verdict"] == NO_VERDICT]


def _figure(row: dict) -> str:
    readout = f" ({row['readout_a']})" if row["readout_a"] else ""
    return f"{row['metric']}{readout}"


def write_check(out_dir: str | Path, runs: list[str], seeds: list[int], baseline: str = "random"
                ) -> dict:
    """Judge every run under `out_dir/runs/<run>/seed<seed>/` against `baseline` on the validation
    and test splits; write summary.json (mean ± std per run and readout, the paired differences,
    the failures, the figures undecided for want of seeds) and results.md. Returns the summary."""
    out_dir = Path(out_dir)
    pairs = [[run, baseline] for run in runs if run != baseline]
    results = {split: split_results(out_dir, runs, seeds, pairs, split) for split in ("val", "test")}
    failures = [f"{split}: {line}" for split, parts in results.items()
                for line in check_not_worse_than_random(parts["paired"])]
    summary = {split: keyed_rows({part: parts[part] for part in ("summary", "paired")})
               for split, parts in results.items()}
    undecided = [f"{split}: {line}" for split, parts in results.items()
                 for line in undecided_against_random(parts["paired"])]
    summary["failures"] = failures
    summary["undecided"] = undecided
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"- below the random encoder (95% CI wholly below zero): {line}" for line in failures]
    if not failures:
        lines.append("- no pretrained figure is decided below the random encoder (no 95% CI of a "
                     "paired difference wholly below zero)"
                     + (f"; {len(undecided)} undecided, for want of a second seed" if undecided else ""))
    lines += [f"- undecided (a single seed: no interval, no verdict): {line}" for line in undecided]
    verdict = "\n".join(lines)
    (out_dir / "results.md").write_text(
        "## Pretrained runs against the random encoder\n\n" + verdict + "\n\n"
        + report_markdown(results["test"], "test") + "\n" + report_markdown(results["val"], "validation"))
    return summary
