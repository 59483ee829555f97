"""The results tables: gathering per-seed files, mean ± std over seeds, paired differences and the
verdict rule (95% t interval), markdown and figures, on a synthetic results tree with known numbers;
and the committed claims table recomputed from the committed per-seed files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from matplotlib.container import ErrorbarContainer

from pemae.models.monitors import collapse_thresholds
from pemae.report import curves, figures
from pemae.report import claims, stats
from pemae.report.claims import (CLAIM_CELLS, claim_verdicts, claims_markdown, decided_comparisons,
                                 judge_claims, write_claims)
from pemae.report.gather import RunPaths, gather, seed_numbers
from pemae.report.results_files import write_results
from pemae.report.stats import ci_half_width, judge, judge_differences, seeds_needed, t_quantile
from pemae.report.tables import paired_differences, paired_markdown, results_markdown, summarise

REPO = Path(__file__).resolve().parents[1]

SEEDS = [0, 1, 2]
RUNS = ["pemae", "mae", "random", "pixels"]
PAIRS = [["pemae", "mae"], ["pemae", "pixels"]]

# test-split numbers per seed; the validation split is the same plus VAL_OFFSET
PROBES = {
    "pemae": {"cls": {"knn_top1": [80.0, 82.0, 84.0], "linear_top1": [85.0, 86.0, 87.0]},
              "avg": {"knn_top1": [78.0, 79.0, 80.0], "linear_top1": [83.0, 83.0, 83.0]}},
    "mae": {"cls": {"knn_top1": [70.0, 71.0, 72.0], "linear_top1": [84.0, 86.0, 88.0]},
            "avg": {"knn_top1": [75.0, 75.0, 75.0], "linear_top1": [84.0, 85.0, 86.0]}},
    "random": {"cls": {"knn_top1": [40.0, 41.0, 42.0], "linear_top1": [45.0, 45.0, 45.0]},
               "avg": {"knn_top1": [50.0, 50.0, 50.0], "linear_top1": [52.0, 52.0, 52.0]}},
    "pixels": {"pixels": {"knn_top1": [85.0, 85.0, 85.0], "linear_top1": [84.0, 84.0, 84.0]}},
}
FINETUNE = {"pemae": [90.0, 91.0, 92.0], "mae": [89.0, 90.0, 91.0], "random": [80.0, 81.0, 82.0]}
PROTOCOL = {"pemae": "fine-tuned (layer decay 0.75)", "mae": "fine-tuned (layer decay 0.75)",
            "random": "from scratch (layer decay 1.0)"}
IMAGES_PER_S = {"pemae": [100.0, 110.0, 120.0], "mae": [300.0, 300.0, 300.0], "random": [0, 0, 0]}
COLLAPSED = {"pemae": [False, True, False]}  # MAE and random report no collapse flag
DENSE_MIOU = {"pemae": [20.0, 21.0, 22.0], "mae": [18.0, 18.0, 18.0], "random": [13.0, 14.0, 15.0]}
VAL_OFFSET = 0.5


def write_json(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def write_tree(results_dir):
    """The files every stage of every run and seed writes."""
    for run in RUNS:
        for i, seed in enumerate(SEEDS):
            paths = RunPaths(results_dir, run, seed)
            test = {r: {m: v[i] for m, v in ms.items()} for r, ms in PROBES[run].items()}
            val = {r: {m: v + VAL_OFFSET for m, v in ms.items()} for r, ms in test.items()}
            write_json(paths.evaluation, {"val": val, "test": test})
            if run == "pixels":
                continue
            pretrain = {"images_per_s": IMAGES_PER_S[run][i], "final_loss": 1.5}
            if run in COLLAPSED:
                pretrain["collapsed"] = COLLAPSED[run][i]
            write_json(paths.pretrain / "summary.json", pretrain)
            write_json(paths.finetune / "summary.json",
                       {"val_top1": FINETUNE[run][i] + VAL_OFFSET, "test_top1": FINETUNE[run][i], "epochs": 5,
                        "labelled_images": 1000, "seconds": 3.0, "protocol": PROTOCOL[run]})
            miou = DENSE_MIOU[run][i]
            write_json(paths.dense, {"val": {"miou": miou + VAL_OFFSET, "pixel_acc": 80.0},
                                     "test": {"miou": miou, "pixel_acc": 79.0}})


@pytest.fixture
def tree(tmp_path):
    write_tree(tmp_path)
    return tmp_path


def find(rows, **keys):
    matches = [r for r in rows if all(r.get(k) == v for k, v in keys.items())]
    assert len(matches) == 1, (keys, matches)
    return matches[0]


def test_run_paths_follow_the_per_seed_layout(tmp_path):
    paths = RunPaths(tmp_path, "mae", 2)
    assert paths.root == tmp_path / "runs" / "mae" / "seed2"
    assert paths.evaluation == paths.root / "evaluate.json"
    assert paths.encoder == paths.root / "pretrain" / "encoder.pt"
    assert paths.checkpoint == paths.root / "pretrain" / "checkpoint.pt"
    assert paths.finetune == paths.root / "finetune"


def test_gather_gives_one_row_per_run_seed_and_readout(tree):
    rows = gather(tree, RUNS, SEEDS)
    assert len(rows) == 3 * (2 + 2 + 2 + 1)
    assert [(r["run"], r["seed"], r["readout"]) for r in rows[:4]] == [
        ("pemae", 0, "cls"), ("pemae", 0, "avg"), ("pemae", 1, "cls"), ("pemae", 1, "avg")]
    row = find(rows, run="pemae", seed=1, readout="avg")
    assert (row["knn_top1"], row["linear_top1"], row["finetune_top1"]) == (79.0, 83.0, 91.0)
    assert row["collapsed"] is True and row["pretrain_images_per_s"] == 110.0
    assert row["finetune_protocol"] == PROTOCOL["pemae"]
    assert find(rows, run="random", seed=0, readout="cls")["pretrain_images_per_s"] is None
    pixels = find(rows, run="pixels", seed=2, readout="pixels")
    assert pixels["knn_top1"] == 85.0 and "finetune_top1" not in pixels


def test_gather_reads_the_validation_split(tree):
    rows = gather(tree, RUNS, SEEDS, split="val")
    row = find(rows, run="mae", seed=0, readout="cls")
    assert (row["knn_top1"], row["finetune_top1"]) == (70.5, 89.5)


def test_summarise_gives_mean_and_sample_std_over_seeds(tree):
    summary = summarise(gather(tree, RUNS, SEEDS))
    assert [(r["run"], r["readout"]) for r in summary] == [
        ("pemae", "cls"), ("pemae", "avg"), ("mae", "cls"), ("mae", "avg"),
        ("random", "cls"), ("random", "avg"), ("pixels", "pixels")]
    cls = summary[0]
    assert (cls["knn_top1_mean"], cls["knn_top1_std"], cls["knn_top1_n"]) == (82.0, 2.0, 3)  # ddof 1
    assert (cls["linear_top1_mean"], cls["linear_top1_std"]) == (86.0, 1.0)
    assert (cls["finetune_top1_mean"], cls["finetune_top1_std"]) == (91.0, 1.0)
    assert (cls["pretrain_images_per_s_mean"], cls["pretrain_images_per_s_std"]) == (110.0, 10.0)
    assert cls["collapsed"] is True and cls["collapsed_seeds"] == 1 and cls["seeds"] == SEEDS
    assert summary[1]["linear_top1_std"] == 0.0
    assert summary[2]["collapsed"] is None  # MAE has no pseudo labels to collapse
    random = summary[4]
    assert "pretrain_images_per_s_mean" not in random  # not pretrained: no throughput
    assert random["finetune_protocol"].startswith("from scratch")
    assert "finetune_top1_mean" not in summary[6]  # pixels: nothing to fine-tune


def test_summarise_gives_zero_std_for_a_single_seed(tree):
    summary = summarise(gather(tree, ["mae"], [1]))
    assert (summary[0]["knn_top1_mean"], summary[0]["knn_top1_std"], summary[0]["knn_top1_n"]) == (71.0, 0.0, 1)


T3 = 4.302652729749462  # t(0.975, 2): the 95% interval of a mean over 3 seeds
T3_POWER = 1.0606601717798214  # t(0.80, 2)


def test_paired_differences_are_seed_by_seed_with_verdicts(tree):
    diffs = paired_differences(gather(tree, RUNS, SEEDS), [["pemae", "mae"]])
    knn = find(diffs, metric="knn_top1", readout_a="cls")  # diffs 10, 11, 12
    assert (knn["mean"], knn["sd"], knn["n"], knn["seeds"]) == (11.0, 1.0, 3, SEEDS)
    assert (knn["ci_low"], knn["ci_high"]) == pytest.approx((11 - T3 / math.sqrt(3), 11 + T3 / math.sqrt(3)))
    assert knn["mde"] == pytest.approx((T3 + T3_POWER) / math.sqrt(3))
    assert knn["verdict"] == "holds"  # a (pemae) better: the whole interval above zero
    linear = find(diffs, metric="linear_top1", readout_a="cls")  # diffs 1, 0, -1
    assert (linear["mean"], linear["sd"]) == (0.0, 1.0) and linear["verdict"] == "inconclusive"
    avg_linear = find(diffs, metric="linear_top1", readout_a="avg")  # diffs -1, -2, -3: -2 ± 2.48
    assert avg_linear["mean"] == -2.0 and avg_linear["verdict"] == "inconclusive"
    finetune = find(diffs, metric="finetune_top1")  # diffs 1, 1, 1: no spread, interval [1, 1]
    assert finetune["readout_a"] is None and (finetune["mean"], finetune["sd"]) == (1.0, 0.0)
    assert finetune["verdict"] == "holds"
    assert len(diffs) == 2 * 2 + 2  # two readouts × two probes; fine-tune and dense mIoU once
    reverse = find(paired_differences(gather(tree, RUNS, SEEDS), [["mae", "pemae"]]),
                   metric="knn_top1", readout_a="cls")
    assert reverse["mean"] == -11.0 and reverse["verdict"] == "reversed"


def test_paired_differences_against_raw_pixels_use_each_readout(tree):
    diffs = paired_differences(gather(tree, RUNS, SEEDS), [["pemae", "pixels"]])
    assert [(d["readout_a"], d["readout_b"], d["metric"]) for d in diffs] == [
        ("cls", "pixels", "knn_top1"), ("avg", "pixels", "knn_top1"),
        ("cls", "pixels", "linear_top1"), ("avg", "pixels", "linear_top1")]  # no fine-tune for pixels
    assert find(diffs, readout_a="cls", metric="knn_top1")["mean"] == -3.0


def test_paired_differences_use_only_shared_seeds_and_need_two(tree):
    rows = [r for r in gather(tree, RUNS, SEEDS) if not (r["run"] == "mae" and r["seed"] != 0)]
    knn = find(paired_differences(rows, [["pemae", "mae"]]), metric="knn_top1", readout_a="cls")
    assert (knn["seeds"], knn["mean"], knn["n"]) == ([0], 10.0, 1)
    assert knn["verdict"] == "too few seeds"  # one seed: no spread, no interval, no verdict
    assert knn["sd"] is knn["ci_low"] is knn["ci_high"] is knn["mde"] is None


def test_missing_files_give_missing_keys_not_errors(tree):
    (RunPaths(tree, "mae", 2).finetune / "summary.json").unlink()
    RunPaths(tree, "pemae", 2).evaluation.unlink()
    rows = gather(tree, RUNS + ["ghost"], SEEDS + [7])
    assert not [r for r in rows if r["run"] == "ghost" or r["seed"] == 7]
    assert "finetune_top1" not in find(rows, run="mae", seed=2, readout="cls")
    unevaluated = find(rows, run="pemae", seed=2)
    assert unevaluated["readout"] is None and unevaluated["finetune_top1"] == 92.0
    assert "knn_top1" not in unevaluated
    summary = summarise(rows)
    pemae_cls = find(summary, run="pemae", readout="cls")
    assert (pemae_cls["knn_top1_mean"], pemae_cls["knn_top1_n"]) == (81.0, 2)
    assert (pemae_cls["finetune_top1_mean"], pemae_cls["finetune_top1_n"]) == (91.0, 3)  # all seeds
    assert not [r for r in summary if r["readout"] is None]  # folded into the evaluated readouts
    assert find(summary, run="mae", readout="cls")["finetune_top1_n"] == 2
    assert "| mae | CLS |" in results_markdown(summary)


def test_a_run_with_nothing_evaluated_still_shows_its_fine_tune(tmp_path):
    write_json(RunPaths(tmp_path, "mae", 0).finetune / "summary.json",
               {"val_top1": 70.0, "test_top1": 71.0, "protocol": "fine-tuned (layer decay 0.75)"})
    summary = summarise(gather(tmp_path, ["mae"], SEEDS))
    assert [(r["run"], r["readout"], r["finetune_top1_mean"]) for r in summary] == [("mae", None, 71.0)]
    assert "| mae | – | – | – | 71.00 ± 0.00 | – | – | – |" in results_markdown(summary)


def test_results_markdown_has_the_long_table(tree):
    md = results_markdown(summarise(gather(tree, RUNS, SEEDS)))
    lines = md.splitlines()
    assert lines[0] == ("| run | features | k-NN | linear | fine-tune | dense mIoU | pretrain img/s "
                        "| collapsed |")
    assert ("| pemae | CLS | 82.00 ± 2.00 | 86.00 ± 1.00 | 91.00 ± 1.00 | 21.00 ± 1.00 | 110.00 ± 10.00 "
            "| yes (1 of 3 seeds) |") in lines
    assert "| pemae | avg patches | 79.00 ± 1.00 | 83.00 ± 0.00 |  |  |  |  |" in lines  # per-run cells once
    assert "| mae | CLS | 71.00 ± 1.00 | 86.00 ± 2.00 | 90.00 ± 1.00 | 18.00 ± 0.00 | 300.00 ± 0.00 | – |" in lines
    assert "| random | CLS | 41.00 ± 1.00 | 45.00 ± 0.00 | 81.00 ± 1.00 (scratch) | 14.00 ± 1.00 | – | – |" in lines
    assert "| pixels | raw pixels | 85.00 ± 0.00 | 84.00 ± 0.00 | – | – | – | – |" in lines
    assert "n = 3 seeds" in lines[-1]


def test_paired_markdown_shows_differences_and_verdicts(tree):
    md = paired_markdown(paired_differences(gather(tree, RUNS, SEEDS), PAIRS))
    lines = md.splitlines()
    assert lines[0] == "| a − b | features | metric | mean ± sd | 95% CI | seeds | MDE | verdict |"
    assert "| pemae − mae | CLS | k-NN | +11.00 ± 1.00 | [+8.52, +13.48] | 3 | 3.10 | pemae better |" in lines
    assert ("| pemae − mae | avg patches | linear | -2.00 ± 1.00 | [-4.48, +0.48] | 3 | 3.10 "
            "| inconclusive |") in lines
    assert "| pemae − mae | – | fine-tune | +1.00 ± 0.00 | [+1.00, +1.00] | 3 | 0.00 | pemae better |" in lines
    assert "| pemae − mae | – | dense mIoU | +3.00 ± 1.00 | [+0.52, +5.48] | 3 | 3.10 | pemae better |" in lines
    assert "| pemae − pixels | – | dense mIoU |" not in md  # the pixel baseline has no dense probe
    assert ("| pemae − pixels | CLS vs raw pixels | k-NN | -3.00 ± 2.00 | [-7.97, +1.97] | 3 | 6.19 "
            "| inconclusive |") in lines
    assert "t(0.975, n − 1)" in md and "80% power" in md


def test_write_results_writes_both_splits_and_json(tree):
    results = write_results(tree, RUNS, PAIRS)
    test_md, val_md = (tree / "results.md").read_text(), (tree / "results_val.md").read_text()
    assert "| pemae | CLS | 82.00 ± 2.00 |" in test_md and "pemae − mae" in test_md
    assert "| pemae | CLS | 82.50 ± 2.00 |" in val_md and "validation" in val_md
    metrics = json.loads((tree / "results.json").read_text())
    assert set(metrics) == {"test", "val"} and set(metrics["test"]) == {"seeds", "summary", "paired", "claims"}
    assert metrics["val"]["summary"]["pemae/cls"]["knn_top1_mean"] == 82.5
    assert metrics["test"]["seeds"]["mae/seed1/avg"]["linear_top1"] == 85.0
    assert metrics["test"]["paired"]["pemae-mae/cls-cls/knn_top1"]["verdict"] == "holds"
    assert len(metrics["test"]["seeds"]) == len(results["test"]["seeds"]) == 21
    assert results["test"]["summary"][0]["run"] == "pemae"


def test_write_results_writes_the_compact_metrics_file(tree):
    results = write_results(tree, RUNS, PAIRS)
    metrics = json.loads((tree / "metrics.json").read_text())["test"]
    summary = {(r["run"], r["readout"]): r for r in results["test"]["summary"]}
    pemae = summary[("pemae", "cls")]
    assert metrics["pemae"]["knn"] == round(pemae["knn_top1_mean"], 2) == 82.0
    assert metrics["pemae"]["knn_ci95"] == round(T3 * 2.0 / math.sqrt(3), 2)  # std 2, n 3
    assert metrics["pemae"]["seeds"] == 3 and "finetune" in metrics["pemae"]
    assert set(metrics["pixels"]) == {"seeds", "knn", "knn_ci95", "linear", "linear_ci95"}
    assert all(not key.startswith("avg") for run in metrics.values() for key in run)


def test_dvc_declares_one_compact_metrics_file():
    """`dvc metrics show` / `dvc exp show` read results/metrics.json alone; the per-seed and
    study files are plain outputs."""
    declared = []
    for path in (REPO / "dvc.yaml", REPO / "study" / "dvc.yaml"):
        for name, stage in yaml.safe_load(path.read_text())["stages"].items():
            declared += [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", [])]
    assert declared == ["results/metrics.json"]


def test_write_results_over_several_folders_reads_every_seed(tree, tmp_path_factory):
    """`folders`: a run's seeds from every folder (an extra seed trained elsewhere joins the
    table and the paired differences), written under `stem`, runs in the order given."""
    extra = tmp_path_factory.mktemp("extra_seeds")
    for run in ("pemae", "mae"):
        shutil.copytree(tree / "runs" / run / "seed0", extra / "runs" / run / "seed7")
    results = write_results(tree, ["mae", "pemae"], PAIRS, folders=[tree, extra], stem="every")
    summary = {(r["run"], r["readout"]): r for r in results["test"]["summary"]}
    assert summary[("pemae", "cls")]["seeds"] == [0, 1, 2, 7]
    assert [r["run"] for r in results["test"]["summary"]][0] == "mae"
    paired = find(results["test"]["paired"], a="pemae", b="mae", readout_a="cls", metric="knn_top1")
    assert paired["seeds"] == [0, 1, 2, 7]
    assert (tree / "every.md").is_file() and (tree / "every_val.md").is_file()
    assert json.loads((tree / "every.json").read_text())["test"]["seeds"]["pemae/seed7/cls"]
    assert not (tree / "results.md").exists()  # the pipeline's table is not touched


def test_figures_render_summary_rows_to_png(tree):
    summary = summarise(gather(tree, RUNS, SEEDS))
    fig = figures.grouped_bars(summary, ["knn_top1", "linear_top1", "finetune_top1"])
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert len(heights) == 7 + 7 + 3  # every run and readout per probe; one fine-tune bar per run
    assert 82.0 in heights and 81.0 in heights
    errorbars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    first = errorbars[0].lines[2][0].get_segments()[0]  # pemae CLS k-NN: 82 ± its CI
    assert first[1][1] - first[0][1] == pytest.approx(2 * T3 * 2.0 / math.sqrt(3))  # std 2, n 3
    assert "95% CI" in ax.get_title() and "n = 3 seeds per bar" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels(minor=True)] == ["collapsed"] * 5  # pemae's bars
    assert curves.save(fig, tree / "accuracy.png").stat().st_size > 1000
    table = figures.table_figure(summary, title="results")
    assert curves.save(table, tree / "table.png").stat().st_size > 1000
    texts = {cell.get_text().get_text() for cell in table.axes[0].tables[0].get_celld().values()}
    assert "81.00 ± 1.00 (scratch)" in texts


def test_curves_draw_the_reference_lines_the_caller_passes(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,cls_entropy,cls_perplexity\n0,6.9,900\n10,6.0,40\n20,5.0,3\n")
    thresholds = collapse_thresholds(1024)
    assert thresholds["cls_entropy"] == (math.log(1024), "uniform (log K)")
    fig = curves.curves({"pemae/seed0": log}, ["cls_entropy", "cls_perplexity", "loss"], thresholds)
    entropy, perplexity, loss = fig.axes
    assert [line.get_label() for line in entropy.lines] == ["pemae/seed0", "uniform (log K)"]
    assert entropy.lines[1].get_ydata()[0] == pytest.approx(math.log(1024))
    assert perplexity.lines[1].get_ydata()[0] == 2.0 and perplexity.get_yscale() == "log"
    assert not loss.lines
    assert not curves.curves({"a": log}, ["cls_perplexity"]).axes[0].lines[1:]  # no lines unless asked
    assert curves.save(fig, tmp_path / "monitors.png").stat().st_size > 1000


# --------------------------------------------------------------------------------------------
# The paper's claims
# --------------------------------------------------------------------------------------------
CLAIMS = {"PEMAE beats MAE": ["pemae", "mae"], "MAE beats PEMAE": ["mae", "pemae"],
          "random beats MAE": ["random", "mae"], "two teachers beat one": ["pemae", "single_teacher"]}


def test_claim_verdicts_read_the_paired_differences_in_the_papers_direction(tree):
    rows = {r["claim"]: r for r in claim_verdicts(gather(tree, RUNS, SEEDS), CLAIMS)}
    pemae_mae = rows["PEMAE beats MAE"]
    assert (pemae_mae["a"], pemae_mae["b"]) == ("pemae", "mae")
    knn = pemae_mae["cls/knn_top1"]
    assert set(knn) == {"mean", "sd", "n", "seeds", "ci_low", "ci_high", "half_width", "mde",
                        "verdict", "seeds_needed"}
    assert (knn["mean"], knn["sd"], knn["n"], knn["verdict"]) == (11.0, 1.0, 3, "holds")
    assert knn["ci_low"] == pytest.approx(11 - T3 / math.sqrt(3))
    assert pemae_mae["cls/linear_top1"]["verdict"] == "inconclusive"  # diffs 1, 0, -1
    assert pemae_mae["None/finetune_top1"]["verdict"] == "holds"  # diffs 1, 1, 1
    assert pemae_mae["None/dense_miou"]["verdict"] == "holds"  # diffs 2, 3, 4
    assert pemae_mae["cls/linear_top1"]["seeds_needed"] == seeds_needed(1.0) == 18
    assert pemae_mae["seeds_enough"] is False  # linear: ± 2.48 over 3 seeds
    reverse = rows["MAE beats PEMAE"]
    assert reverse["cls/knn_top1"]["mean"] == -11.0 and reverse["cls/knn_top1"]["verdict"] == "reversed"
    random = rows["random beats MAE"]  # random 40-42 vs mae 70-72: far below
    assert random["cls/knn_top1"]["verdict"] == "reversed"
    assert random["None/finetune_top1"]["verdict"] == "reversed"  # 81 vs 90 on every seed
    assert random["seeds_enough"] is False  # fine-tune: no spread; linear: diffs -39, -41, -43
    ghost = rows["two teachers beat one"]  # single_teacher never ran
    assert all(ghost[k] == {"verdict": "not run"} for k in ("cls/knn_top1", "cls/linear_top1",
                                                            "None/finetune_top1", "None/dense_miou"))
    assert ghost["seeds_enough"] is None


def test_claims_markdown_gives_a_cell_per_metric_and_the_rule(tree):
    text = claims_markdown(claim_verdicts(gather(tree, RUNS, SEEDS), CLAIMS))
    assert text.splitlines()[0] == ("| claim | a − b | k-NN (CLS) | linear (CLS) | fine-tune | dense mIoU "
                                    "| seeds enough? |")
    assert ("| PEMAE beats MAE | pemae − mae | +11.00 (sd 1.00, n 3), CI [+8.52, +13.48]: **holds** "
            "| +0.00 (sd 1.00, n 3), CI [-2.48, +2.48]: inconclusive, could detect ≥ 3.10 points |") in text
    assert "| no (linear ± 2.48, ~18 seeds) |" in text
    assert "| MAE beats PEMAE | mae − pemae | -11.00 (sd 1.00, n 3), CI [-13.48, -8.52]: **reversed** |" in text
    assert ("| two teachers beat one | pemae − single_teacher | not run | not run | not run | not run "
            "| not run |") in text
    assert "direction is a > b" in text and "t(0.975, n − 1)" in text


def test_a_single_seed_gives_no_verdict_in_the_claims(tree):
    rows = claim_verdicts(gather(tree, RUNS, [0]), {"PEMAE beats MAE": ["pemae", "mae"]})
    cell = rows[0]["cls/knn_top1"]
    assert (cell["mean"], cell["n"], cell["verdict"]) == (10.0, 1, "too few seeds")
    assert cell["ci_low"] is cell["mde"] is cell["seeds_needed"] is None
    assert rows[0]["seeds_enough"] is False  # one seed: no half-width yet, not enough
    text = claims_markdown(rows)
    assert "+10.00 (n 1): no verdict, too few seeds" in text and "linear: one seed" in text


def judged_cell(mean: float, sd: float, n: int) -> dict:
    """A claims.json cell for a paired difference of this mean, sd and seed count."""
    return claims.claim_cell({**judge(mean, sd, n), "seeds": list(range(n))})


def settled_row() -> dict:
    """A claim whose linear probe met the half-width arm of the stopping rule and whose
    fine-tuning met the 10-seed arm; its dense probe never ran."""
    return {"claim": "c beats d", "a": "c", "b": "d", "cls/knn_top1": judged_cell(-2.0, 0.5, 5),
            "cls/linear_top1": judged_cell(0.1, 0.3, 5), "None/finetune_top1": judged_cell(0.2, 1.0, 10),
            "None/dense_miou": {"verdict": "not run"}, "seeds_enough": True}


def test_a_settled_claim_says_which_arm_of_the_stopping_rule_it_met():
    row = settled_row()
    assert row["cls/linear_top1"]["half_width"] == pytest.approx(0.372, abs=1e-3)  # 2.776 · 0.3 / √5
    assert "| yes (linear ± 0.37; fine-tune ± 0.72 at the 10-seed cap) |" in claims_markdown([row])
    narrow = {**row, "None/finetune_top1": judged_cell(0.2, 0.6, 10)}
    assert "| yes (linear ± 0.37; fine-tune ± 0.43) |" in claims_markdown([narrow])  # 2.262 · 0.6 / √10


def test_the_readme_block_keeps_unjudged_cells_out_of_the_inconclusive_list():
    block = claims.readme_claims({"test": {"c-d": settled_row()}})
    assert '- **Decided:** "c beats d" on k-NN (CLS): **reversed**, -2.00 points' in block
    assert '  - "c beats d": linear (CLS) ≥ ' in block and "fine-tune ≥ " in block
    inconclusive = block.split("- **Inconclusive**")[1].split("- **No verdict**")[0]
    assert "not run" not in inconclusive and "dense" not in inconclusive
    assert '- **No verdict** (not run) on dense mIoU: "c beats d".' in block


def test_write_results_puts_the_claims_first(tree):
    results = write_results(tree, ["pemae", "mae"], [], claims={"PEMAE beats MAE": ["pemae", "mae"]})
    text = (tree / "results.md").read_text()
    assert text.startswith("## The paper's claims (test split)")
    assert results["val"]["claims"][0]["cls/knn_top1"]["verdict"] == "holds"
    assert "**holds**" in text.split("## Results")[0]
    metrics = json.loads((tree / "results.json").read_text())
    assert metrics["test"]["claims"]["pemae-mae"]["claim"] == "PEMAE beats MAE"
    write_results(tree, ["pemae", "mae"], [])
    assert (tree / "results.md").read_text().startswith("## Results (test split)")  # no claims: no section


def test_write_claims_reads_runs_from_several_folders(tree, tmp_path_factory):
    """The ablation runs live in their own folder; a run in the first folder wins."""
    ablations = tmp_path_factory.mktemp("ablations")
    for i, seed in enumerate(SEEDS):  # single_teacher: pemae's CLS k-NN minus 20
        knn = PROBES["pemae"]["cls"]["knn_top1"][i] - 20
        write_json(RunPaths(ablations, "single_teacher", seed).evaluation,
                   {"test": {"cls": {"knn_top1": knn, "linear_top1": 0.0}}, "val": {}})
        write_json(RunPaths(ablations, "pemae", seed).evaluation,  # shadowed by the tree's pemae
                   {"test": {"cls": {"knn_top1": 0.0, "linear_top1": 0.0}}, "val": {}})
    out = tmp_path_factory.mktemp("out")
    verdicts = write_claims(out, [tree, ablations], CLAIMS)  # every seed folder found
    rows = {r["claim"]: r for r in verdicts["test"]}
    two = rows["two teachers beat one"]["cls/knn_top1"]
    assert (two["mean"], two["sd"], two["n"], two["verdict"]) == (20.0, 0.0, 3, "holds")
    assert rows["PEMAE beats MAE"]["cls/knn_top1"]["mean"] == 11.0  # the tree's pemae, not the shadow
    val_rows = {r["claim"]: r for r in verdicts["val"]}
    assert val_rows["two teachers beat one"]["cls/knn_top1"] == {"verdict": "not run"}  # no val figures
    text = (out / "claims.md").read_text()
    assert "## The paper's claims (test split)" in text and "## The paper's claims (validation split)" in text
    assert json.loads((out / "claims.json").read_text())["test"]["pemae-single_teacher"]["b"] == "single_teacher"


# --------------------------------------------------------------------------------------------
# The verdict rule: the 95% t interval of the mean paired difference
# --------------------------------------------------------------------------------------------
def test_t_quantiles_match_the_conventions_table():
    """CONVENTIONS.md, "Statistics of a paired comparison", for n − 1 = 1 … 9."""
    t975 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26]
    assert [round(t_quantile(0.975, df), 2) for df in range(1, 10)] == t975
    # t(0.80) for n − 1 = 2 … 9 (for one degree of freedom it is 1.376; the 1.89 listed there
    # is t(0.90, 2))
    assert [round(t_quantile(0.80, df), 2) for df in range(2, 10)] == [1.06, 0.98, 0.94, 0.92, 0.91,
                                                                       0.90, 0.89, 0.88]
    assert t_quantile(0.80, 1) == pytest.approx(1.3764, abs=1e-4)


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30, 31, 120])
def test_the_t_quantile_without_scipy_agrees_with_scipy(df):
    pytest.importorskip("scipy")
    for p in (0.80, 0.975):
        assert stats._t_quantile_fallback(p, df) == pytest.approx(t_quantile(p, df), abs=1e-4)


@pytest.mark.parametrize("mean, sd, n, verdict", [
    (-2.35, 0.20, 3, "reversed"),       # PEMAE − MAE, CLS k-NN: the whole interval below zero
    (-1.39, 0.80, 3, "inconclusive"),   # PEMAE − MAE, CLS linear: the interval reaches above zero
    (-0.61, 0.88, 3, "inconclusive"),   # CLS labels − token recon, CLS linear
    (1.00, 0.20, 3, "holds"),           # the whole interval above zero
    (0.05, 0.00, 3, "holds"),           # no spread: the interval is the mean itself
    (0.00, 0.00, 5, "inconclusive"),    # an interval that touches zero contains it
    (-1.00, None, 1, "too few seeds"),  # one seed: no sd, no interval, no verdict
])
def test_judge_gives_the_worked_examples(mean, sd, n, verdict):
    assert judge(mean, sd, n)["verdict"] == verdict


def test_judge_gives_the_interval_and_the_minimum_detectable_effect():
    found = judge(-2.35, 0.20, 3)
    half = 4.303 * 0.20 / math.sqrt(3)
    assert (found["ci_low"], found["ci_high"]) == pytest.approx((-2.35 - half, -2.35 + half), abs=1e-3)
    assert found["half_width"] == pytest.approx(half, abs=1e-3)
    assert found["mde"] == pytest.approx((4.303 + 1.061) * 0.20 / math.sqrt(3), abs=1e-3)
    assert (found["mean"], found["sd"], found["n"]) == (-2.35, 0.20, 3)
    inconclusive = judge(-1.39, 0.80, 3)
    assert inconclusive["ci_low"] < 0 < inconclusive["ci_high"]
    assert inconclusive["mde"] == pytest.approx(2.477, abs=1e-3)
    single = judge(-1.0, None, 1)
    assert single["ci_low"] is single["ci_high"] is single["half_width"] is single["mde"] is None
    assert judge_differences([1.0, 2.0, 3.0]) == judge(2.0, 1.0, 3)
    assert judge_differences([-0.5])["verdict"] == "too few seeds"


def test_seeds_enough_is_the_stopping_rule():
    assert claims.seeds_enough({"verdict": "inconclusive", "n": 3, "half_width": 0.5}) is True
    assert claims.seeds_enough({"verdict": "inconclusive", "n": 9, "half_width": 0.51}) is False
    assert claims.seeds_enough({"verdict": "inconclusive", "n": 10, "half_width": 0.9}) is True
    assert claims.seeds_enough({"verdict": "too few seeds", "n": 1, "half_width": None}) is False
    assert claims.seeds_enough({"verdict": "not run"}) is None


def test_seeds_needed_is_the_smallest_n_for_the_half_width():
    assert ci_half_width(1.0, 3) == pytest.approx(T3 / math.sqrt(3))
    assert ci_half_width(1.0, 1) is None
    for sd in (0.16, 0.5, 1.2):
        n = seeds_needed(sd)
        assert ci_half_width(sd, n) <= 0.5 < ci_half_width(sd, n - 1) if n > 2 else True
    assert (seeds_needed(0.16), seeds_needed(1.2)) == (3, 25)  # CONVENTIONS.md: roughly 3–25
    assert seeds_needed(0.0) == 2 and seeds_needed(None) is None


# --------------------------------------------------------------------------------------------
# Every seed trained counts, not only params.yaml `seeds`
# --------------------------------------------------------------------------------------------
def add_seed(results_dir, run, seed, knn, finetune):
    paths = RunPaths(results_dir, run, seed)
    split = {"cls": {"knn_top1": knn, "linear_top1": 80.0}}
    write_json(paths.evaluation, {"val": split, "test": split})
    write_json(paths.finetune / "summary.json", {"val_top1": finetune, "test_top1": finetune})


def test_every_seed_folder_is_read_and_pairs_use_the_shared_ones(tree):
    add_seed(tree, "pemae", 3, 86.0, 93.0)  # a fourth seed for pemae and mae only
    add_seed(tree, "mae", 3, 73.0, 92.0)
    add_seed(tree, "pemae", 9, 90.0, 94.0)  # a seed mae has not trained
    (RunPaths(tree, "mae", 5).root).mkdir(parents=True)  # an empty folder: not a trained seed
    assert seed_numbers(tree, "pemae") == [0, 1, 2, 3, 9]
    rows = gather(tree, ["pemae", "mae"])
    assert sorted({r["seed"] for r in rows if r["run"] == "mae"}) == [0, 1, 2, 3]
    assert sorted({r["seed"] for r in gather(tree, ["pemae"], SEEDS)}) == SEEDS  # a list: only those
    knn = find(paired_differences(rows, [["pemae", "mae"]]), metric="knn_top1", readout_a="cls")
    assert (knn["seeds"], knn["n"], knn["mean"]) == ([0, 1, 2, 3], 4, 11.5)  # diffs 10 … 13
    written = write_results(tree, ["pemae", "mae"], [["pemae", "mae"]])
    cls = find(written["test"]["summary"], run="pemae", readout="cls")
    assert (cls["knn_top1_n"], cls["finetune_top1_n"]) == (5, 5)
    text = (tree / "results.md").read_text()
    assert "(n 5)" in text and "n = 3 seeds per figure unless the cell says (n k)" in text
    assert "| pemae − mae | CLS | k-NN | +11.50 ±" in text and "| 4 |" in text
    verdicts = write_claims(tree, [tree], {"PEMAE beats MAE": ["pemae", "mae"]})
    assert verdicts["test"][0]["cls/knn_top1"]["n"] == 4
    assert "n 4" in (tree / "claims.md").read_text()


# --------------------------------------------------------------------------------------------
# The committed claims table: every verdict recomputed from the committed per-seed files
# --------------------------------------------------------------------------------------------
COMMITTED_CLAIMS = REPO / "results" / "claims.json"


def committed_claims() -> dict:
    return json.loads(COMMITTED_CLAIMS.read_text())


def test_no_committed_verdict_is_decided_where_its_interval_contains_zero():
    for split, rows in committed_claims().items():
        for row in rows.values():
            for key in CLAIM_CELLS:
                cell = row[key]
                if cell["verdict"] == "not run":
                    continue
                assert cell["verdict"] == judge(cell["mean"], cell["sd"], cell["n"])["verdict"], (split, key)
                if cell["n"] < 2:
                    assert cell["verdict"] == "too few seeds"
                elif cell["ci_low"] <= 0 <= cell["ci_high"]:
                    assert cell["verdict"] == "inconclusive", (split, row["claim"], key, cell)
                else:
                    assert cell["verdict"] == ("holds" if cell["ci_low"] > 0 else "reversed")


def test_the_committed_claims_follow_from_the_committed_per_seed_files():
    """Regenerate with study/dvc.yaml:claims (notebooks/studies/claims.ipynb) when a seed is added."""
    claims = yaml.safe_load((REPO / "params.yaml").read_text())["claims"]
    recomputed = judge_claims([REPO / "results", REPO / "results" / "extra_seeds",
                               REPO / "results" / "ablations"], claims)  # as notebooks/studies/claims.ipynb
    committed = committed_claims()
    for split, rows in recomputed.items():
        assert set(committed[split]) == {f"{r['a']}-{r['b']}" for r in rows}
        for row in rows:
            stored = committed[split][f"{row['a']}-{row['b']}"]
            assert stored["claim"] == row["claim"] and stored["seeds_enough"] == row["seeds_enough"]
            for key in CLAIM_CELLS:
                fresh, kept = row[key], stored[key]
                assert kept["verdict"] == fresh["verdict"], (split, row["claim"], key)
                if fresh["verdict"] == "not run":
                    continue
                assert (kept["n"], kept["seeds"]) == (fresh["n"], fresh["seeds"])
                numbers = ("mean", "sd", "ci_low", "ci_high", "mde")
                assert [kept[k] for k in numbers] == pytest.approx([fresh[k] for k in numbers])


def test_decided_comparisons_list_only_holds_and_reversed():
    decided = decided_comparisons(COMMITTED_CLAIMS)
    assert decided == decided_comparisons(committed_claims(), "test")
    assert set(decided.values()) <= {"holds", "reversed"}
    cells = {(row["claim"], key): row[key] for row in committed_claims()["test"].values() for key in CLAIM_CELLS}
    assert {k for k, cell in cells.items() if cell["verdict"] in ("holds", "reversed")} == set(decided)
    for claim, key in decided:  # what a README may call decided: its interval excludes zero
        cell = cells[(claim, key)]
        assert cell["ci_low"] > 0 or cell["ci_high"] < 0


def test_decided_comparisons_on_a_synthetic_table(tree):
    claims_json = {"test": {f"{r['a']}-{r['b']}": r for r in claim_verdicts(gather(tree, RUNS, SEEDS), CLAIMS)}}
    decided = decided_comparisons(claims_json)
    assert decided[("PEMAE beats MAE", "cls/knn_top1")] == "holds"
    assert decided[("MAE beats PEMAE", "cls/knn_top1")] == "reversed"
    assert ("PEMAE beats MAE", "cls/linear_top1") not in decided  # inconclusive
    assert not [k for k in decided if k[0] == "two teachers beat one"]  # not run
