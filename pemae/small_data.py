"""A small data set the defaults were not tuned on, and the check that pretraining helps there.

scikit-learn ships the UCI handwritten digits (1,797 grayscale images, 8 x 8 pixels, 16 grey
levels, 10 classes; Alpaydin & Kaynak 1998) inside the package, so they need no download. They are
written out as an `imagefolder` (`train/<class>/*.png`, `val/<class>/*.png` as the test split) and
go through exactly the code path a user's own image folder takes: any size (`data.img_size`
resamples them), grayscale, a few hundred images per class.

The check (`check_not_worse_than_random`): every pretrained run's k-NN, linear-probe and
fine-tuning accuracy must be at least the randomly initialised encoder's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

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


def scores(evaluation: dict, finetune: dict, split: str) -> dict[str, float]:
    """The figures the check compares, from a run's evaluate and fine-tune results."""
    out = {f"{metric}_{readout}": values[metric]
           for readout, values in evaluation.get(split, {}).items()
           for metric in ("knn_top1", "linear_top1")}
    if f"{split}_top1" in finetune:
        out["finetune_top1"] = finetune[f"{split}_top1"]
    return out


def check_not_worse_than_random(results: dict[str, dict[str, float]], baseline: str = "random"
                                ) -> list[str]:
    """The (run, figure) pairs where a pretrained run is below the random encoder: [] = passed."""
    reference = results[baseline]
    return [f"{run}: {key} = {value:.2f} < {baseline}'s {reference[key]:.2f}"
            for run, figures in results.items() if run != baseline
            for key, value in figures.items() if key in reference and value < reference[key]]
