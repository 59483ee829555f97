"""The small-data check: scikit-learn's digits as an image folder, and the not-worse-than-random rule."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import datasets as sklearn_datasets

from pemae import data
from pemae.config import build_config, deep_merge
from pemae.small_data import (check_not_worse_than_random, digits_overrides, scores,
                              write_digits_imagefolder)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    return write_digits_imagefolder(tmp_path_factory.mktemp("digits"), test_fraction=0.2, seed=0)


def test_digits_are_written_once_each_with_their_label(digits_root):
    digits = sklearn_datasets.load_digits()
    files = sorted(digits_root.glob("*/*/*.png"))
    assert len(files) == len(digits.target) == 1797
    train = [f for f in files if f.parts[-3] == "train"]
    assert len(files) - len(train) == round(0.2 * 1797)
    for f in files[::97]:  # a sample: pixels and label match the source image
        i = int(f.stem)
        assert int(f.parent.name) == digits.target[i]
        expected = np.clip(digits.images[i] * 255 / 16, 0, 255).round().astype(np.uint8)
        assert np.array_equal(np.asarray(Image.open(f)), expected)


def test_digits_folder_loads_through_the_imagefolder_path_at_any_size(digits_root):
    cfg = build_config("tiny", {"data": {"dataset": "imagefolder", "root": str(digits_root),
                                         "img_size": 32, "in_chans": 1, "train_subset": 0,
                                         "test_subset": 0}}).data
    train, val, test = (data.build_dataset(cfg, s, data.eval_transform(cfg)) for s in data.SPLITS)
    assert (len(train) + len(val), len(test)) == (1797 - 359, 359)
    x, y = test[0]
    assert x.shape == (1, 32, 32) and 0 <= y < 10
    assert data.num_classes(train) == 10


def test_writing_again_keeps_the_folder(digits_root):
    before = {f: f.stat().st_mtime_ns for f in digits_root.glob("*/*/*.png")}
    write_digits_imagefolder(digits_root, test_fraction=0.2, seed=0)
    assert {f: f.stat().st_mtime_ns for f in digits_root.glob("*/*/*.png")} == before


def test_scores_take_every_readout_and_the_fine_tune_of_a_split():
    evaluation = {"val": {"cls": {"knn_top1": 50.0, "linear_top1": 60.0}},
                  "test": {"cls": {"knn_top1": 51.0, "linear_top1": 61.0},
                           "avg": {"knn_top1": 52.0, "linear_top1": 62.0}}}
    got = scores(evaluation, {"val_top1": 70.0, "test_top1": 71.0}, "test")
    assert got == {"knn_top1_cls": 51.0, "linear_top1_cls": 61.0, "knn_top1_avg": 52.0,
                   "linear_top1_avg": 62.0, "finetune_top1": 71.0}


def test_check_names_every_figure_below_the_random_encoder():
    results = {"random": {"knn_top1_cls": 70.0, "finetune_top1": 80.0},
               "mae": {"knn_top1_cls": 69.5, "finetune_top1": 80.0},
               "pemae": {"knn_top1_cls": 75.0, "finetune_top1": 79.0}}
    failures = check_not_worse_than_random(results)
    assert failures == ["mae: knn_top1_cls = 69.50 < random's 70.00",
                        "pemae: finetune_top1 = 79.00 < random's 80.00"]
    results["mae"]["knn_top1_cls"] = 70.0
    results["pemae"]["finetune_top1"] = 80.5
    assert check_not_worse_than_random(results) == []  # equal is not worse


def test_digits_overrides_change_only_the_data_and_the_epochs(digits_root):
    runs = {"mae": {"method": {"name": "mae"}}, "random": {"pretrain": {"epochs": 0}}}
    for run, pretrained in (("mae", True), ("random", False)):
        cfg = build_config("tiny", None, runs[run])
        overrides = digits_overrides(digits_root, 32, 40, 20, pretrained)
        moved = build_config("tiny", None, deep_merge(runs[run], overrides))
        assert moved.data.root == str(digits_root) and moved.data.img_size == 32
        assert moved.finetune.epochs == 20
        assert moved.pretrain.epochs == (40 if pretrained else 0)
        assert moved.model == cfg.model and moved.method == cfg.method
