"""The small-data check: scikit-learn's digits as an image folder, and the not-worse-than-random rule."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn import datasets as sklearn_datasets

from pemae import data, results
from pemae.config import build_config, deep_merge
from pemae.results import RunPaths
from pemae.small_data import (check_not_worse_than_random, digits_overrides, write_check,
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


def write_run(root: Path, run: str, seed: int, knn: float, finetune: float) -> None:
    """The files a small-data run leaves: evaluate.json (CLS readout) and the fine-tune summary."""
    paths = RunPaths(root, run, seed)
    paths.finetune.mkdir(parents=True)
    split = {"cls": {"knn_top1": knn, "linear_top1": 50.0}}
    paths.evaluation.write_text(json.dumps({"val": split, "test": split}))
    (paths.finetune / "summary.json").write_text(json.dumps({"val_top1": finetune, "test_top1": finetune}))


def paired(tmp_path: Path, figures: dict[str, list[tuple[float, float]]]) -> list[dict]:
    """Paired rows (run − random, test split) of runs given as [(knn, finetune) per seed]."""
    for run, per_seed in figures.items():
        for seed, (knn, finetune) in enumerate(per_seed):
            write_run(tmp_path, run, seed, knn, finetune)
    seeds = list(range(len(figures["random"])))
    rows = results.gather(tmp_path, list(figures), seeds, "test")
    return results.paired_differences(rows, [[run, "random"] for run in figures if run != "random"])


def test_one_seed_fails_on_any_drop_below_the_random_encoder(tmp_path):
    rows = paired(tmp_path, {"random": [(70.0, 80.0)], "mae": [(69.5, 80.0)], "pemae": [(75.0, 79.0)]})
    failures = check_not_worse_than_random(rows)
    assert len(failures) == 2
    assert failures[0].startswith("mae: knn_top1 (cls) -0.50") and "over 1 seed(s)" in failures[0]
    assert failures[1].startswith("pemae: finetune_top1 -1.00")


def test_with_seeds_a_drop_within_the_noise_passes_and_a_larger_one_fails(tmp_path):
    # random k-NN 70, 72, 74 (std 2): mae is 1 below on every seed (within noise), pemae 5 below
    random = [(70.0, 80.0), (72.0, 80.0), (74.0, 80.0)]
    rows = paired(tmp_path, {"random": random, "mae": [(k - 1, f) for k, f in random],
                             "pemae": [(k - 5, f) for k, f in random]})
    failures = check_not_worse_than_random(rows)
    assert len(failures) == 1 and failures[0].startswith("pemae: knn_top1 (cls) -5.00 ± 0.00")
    assert "over 3 seed(s) (noise 2.00)" in failures[0]


def test_equal_or_better_is_never_a_failure(tmp_path):
    rows = paired(tmp_path, {"random": [(70.0, 80.0)], "mae": [(70.0, 80.0)]})
    assert check_not_worse_than_random(rows) == []


def test_write_check_writes_the_summary_and_the_tables(tmp_path):
    for seed, knn in enumerate((70.0, 72.0)):
        write_run(tmp_path, "random", seed, knn, 80.0)
        write_run(tmp_path, "mae", seed, knn - 6, 81.0)
    summary = write_check(tmp_path, ["mae", "random"], [0, 1])
    assert summary["failures"] == [f"{split}: mae: knn_top1 (cls) -6.00 ± 0.00 against random over "
                                   "2 seed(s) (noise 1.41)" for split in ("val", "test")]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert set(summary["test"]["summary"]) == {"mae/cls", "random/cls"}
    text = (tmp_path / "results.md").read_text()
    assert "- test: mae: knn_top1 (cls) -6.00" in text and "| mae − random |" in text


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


def test_the_committed_small_data_check_passed_over_every_seed():
    """The committed `study/dvc.yaml:small_data` results: on the digits, no pretrained run falls
    below the random encoder beyond noise, judged over every seed of `small_data.seeds` (a rerun
    that regresses lists its failures in summary.json, and this test names them)."""
    repo = Path(__file__).resolve().parents[1]
    check = yaml.safe_load((repo / "params.yaml").read_text())["small_data"]
    summary = json.loads((repo / "results" / "small_data" / "summary.json").read_text())
    assert summary["failures"] == []
    assert len(check["seeds"]) >= 3
    for split in ("val", "test"):
        runs = {row["run"]: row["seeds"] for row in summary[split]["summary"].values()}
        assert runs == {run: check["seeds"] for run in check["runs"]}
        judged = {row["a"] for row in summary[split]["paired"].values() if row["b"] == "random"}
        assert judged == set(check["runs"]) - {"random"}
