"""The results tables: gathering per-seed files, mean ± std over seeds, paired differences, markdown
and figures, on a synthetic results tree with known numbers."""

from __future__ import annotations

import json
import math

import pytest

from pemae import figures
from pemae.results import (RunPaths, claim_verdicts, claims_markdown, gather, paired_differences,
                           paired_markdown, results_markdown, summarise, write_claims, write_results)

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


def test_paired_differences_are_seed_by_seed_with_verdicts(tree):
    diffs = paired_differences(gather(tree, RUNS, SEEDS), [["pemae", "mae"]])
    knn = find(diffs, metric="knn_top1", readout_a="cls")  # diffs 10, 11, 12; noise max(2, 1)
    assert (knn["mean"], knn["std"], knn["n"], knn["noise"]) == (11.0, 1.0, 3, 2.0)
    assert knn["verdict"] == "pemae better"
    linear = find(diffs, metric="linear_top1", readout_a="cls")  # diffs 1, 0, -1
    assert (linear["mean"], linear["std"]) == (0.0, 1.0) and linear["verdict"] == "within noise"
    avg_linear = find(diffs, metric="linear_top1", readout_a="avg")  # diffs -1, -2, -3; noise max(0, 1)
    assert (avg_linear["mean"], avg_linear["noise"]) == (-2.0, 1.0) and avg_linear["verdict"] == "mae better"
    finetune = find(diffs, metric="finetune_top1")  # diffs 1, 1, 1: |1| <= noise 1
    assert finetune["readout_a"] is None and (finetune["mean"], finetune["std"]) == (1.0, 0.0)
    assert finetune["verdict"] == "within noise"
    assert len(diffs) == 2 * 2 + 2  # two readouts × two probes; fine-tune and dense mIoU once


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
    assert knn["verdict"] == "within noise"  # one seed: no estimate of the noise


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
    assert lines[0] == "| a − b | features | metric | difference | seeds | verdict |"
    assert "| pemae − mae | CLS | k-NN | +11.00 ± 1.00 | 3 | pemae better |" in lines
    assert "| pemae − mae | avg patches | linear | -2.00 ± 1.00 | 3 | mae better |" in lines
    assert "| pemae − mae | – | fine-tune | +1.00 ± 0.00 | 3 | within noise |" in lines
    assert "| pemae − mae | – | dense mIoU | +3.00 ± 1.00 | 3 | pemae better |" in lines
    assert "| pemae − pixels | – | dense mIoU |" not in md  # the pixel baseline has no dense probe
    assert "| pemae − pixels | CLS vs raw pixels | k-NN | -3.00 ± 2.00 | 3 | pixels better |" in lines
    assert "larger of the two runs' seed std" in md


def test_write_results_writes_both_splits_and_json(tree):
    results = write_results(tree, RUNS, SEEDS, PAIRS)
    test_md, val_md = (tree / "results.md").read_text(), (tree / "results_val.md").read_text()
    assert "| pemae | CLS | 82.00 ± 2.00 |" in test_md and "pemae − mae" in test_md
    assert "| pemae | CLS | 82.50 ± 2.00 |" in val_md and "validation" in val_md
    metrics = json.loads((tree / "results.json").read_text())
    assert set(metrics) == {"test", "val"} and set(metrics["test"]) == {"seeds", "summary", "paired", "claims"}
    assert metrics["val"]["summary"]["pemae/cls"]["knn_top1_mean"] == 82.5
    assert metrics["test"]["seeds"]["mae/seed1/avg"]["linear_top1"] == 85.0
    assert metrics["test"]["paired"]["pemae-mae/cls-cls/knn_top1"]["verdict"] == "pemae better"
    assert len(metrics["test"]["seeds"]) == len(results["test"]["seeds"]) == 21
    assert results["test"]["summary"][0]["run"] == "pemae"


def test_figures_render_summary_rows_to_png(tree):
    summary = summarise(gather(tree, RUNS, SEEDS))
    fig = figures.grouped_bars(summary, ["knn_top1", "linear_top1", "finetune_top1"])
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert len(heights) == 7 + 7 + 3  # every run and readout per probe; one fine-tune bar per run
    assert 82.0 in heights and 81.0 in heights
    assert [t.get_text() for t in ax.get_xticklabels(minor=True)] == ["collapsed"] * 5  # pemae's bars
    assert figures.save(fig, tree / "accuracy.png").stat().st_size > 1000
    table = figures.table_figure(summary, title="results")
    assert figures.save(table, tree / "table.png").stat().st_size > 1000
    texts = {cell.get_text().get_text() for cell in table.axes[0].tables[0].get_celld().values()}
    assert "81.00 ± 1.00 (scratch)" in texts


def test_curves_draw_the_reference_lines_the_caller_passes(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,cls_entropy,cls_perplexity\n0,6.9,900\n10,6.0,40\n20,5.0,3\n")
    thresholds = figures.collapse_thresholds(1024)
    assert thresholds["cls_entropy"] == (math.log(1024), "uniform (log K)")
    fig = figures.curves({"pemae/seed0": log}, ["cls_entropy", "cls_perplexity", "loss"], thresholds)
    entropy, perplexity, loss = fig.axes
    assert [line.get_label() for line in entropy.lines] == ["pemae/seed0", "uniform (log K)"]
    assert entropy.lines[1].get_ydata()[0] == pytest.approx(math.log(1024))
    assert perplexity.lines[1].get_ydata()[0] == 2.0 and perplexity.get_yscale() == "log"
    assert not loss.lines
    assert not figures.curves({"a": log}, ["cls_perplexity"]).axes[0].lines[1:]  # no lines unless asked
    assert figures.save(fig, tmp_path / "monitors.png").stat().st_size > 1000


# --------------------------------------------------------------------------------------------
# The paper's claims
# --------------------------------------------------------------------------------------------
CLAIMS = {"PEMAE beats MAE": ["pemae", "mae"], "MAE beats PEMAE": ["mae", "pemae"],
          "random beats MAE": ["random", "mae"], "two teachers beat one": ["pemae", "single_teacher"]}


def test_claim_verdicts_read_the_paired_differences_in_the_papers_direction(tree):
    rows = {r["claim"]: r for r in claim_verdicts(gather(tree, RUNS, SEEDS), CLAIMS)}
    pemae_mae = rows["PEMAE beats MAE"]
    assert (pemae_mae["a"], pemae_mae["b"]) == ("pemae", "mae")
    assert pemae_mae["cls/knn_top1"] == {"mean": 11.0, "std": 1.0, "n": 3, "verdict": "holds"}
    assert pemae_mae["cls/linear_top1"]["verdict"] == "within noise"  # diffs 1, 0, -1
    assert pemae_mae["None/finetune_top1"]["verdict"] == "within noise"  # |1| <= noise 1
    assert pemae_mae["None/dense_miou"] == {"mean": 3.0, "std": 1.0, "n": 3, "verdict": "holds"}
    reverse = rows["MAE beats PEMAE"]
    assert reverse["cls/knn_top1"]["mean"] == -11.0 and reverse["cls/knn_top1"]["verdict"] == "does not hold"
    random = rows["random beats MAE"]  # random 40-42 vs mae 70-72: far below
    assert random["cls/knn_top1"]["verdict"] == "does not hold"
    assert random["None/finetune_top1"]["verdict"] == "does not hold"  # 81 vs 90, noise 1
    ghost = rows["two teachers beat one"]  # single_teacher never ran
    assert all(ghost[k] == {"verdict": "not run"} for k in ("cls/knn_top1", "cls/linear_top1",
                                                            "None/finetune_top1", "None/dense_miou"))


def test_claims_markdown_gives_a_cell_per_metric_and_the_rule(tree):
    text = claims_markdown(claim_verdicts(gather(tree, RUNS, SEEDS), CLAIMS))
    assert "| PEMAE beats MAE | pemae − mae | +11.00 ± 1.00 (3): holds | +0.00 ± 1.00 (3): within noise |" in text
    assert "| two teachers beat one | pemae − single_teacher | not run | not run | not run | not run |" in text
    assert "direction is a > b" in text


def test_write_results_puts_the_claims_first(tree):
    results = write_results(tree, ["pemae", "mae"], SEEDS, [], claims={"PEMAE beats MAE": ["pemae", "mae"]})
    text = (tree / "results.md").read_text()
    assert text.startswith("## The paper's claims (test split)")
    assert results["val"]["claims"][0]["cls/knn_top1"]["verdict"] == "holds"
    metrics = json.loads((tree / "results.json").read_text())
    assert metrics["test"]["claims"]["pemae-mae"]["claim"] == "PEMAE beats MAE"
    write_results(tree, ["pemae", "mae"], SEEDS, [])
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
    verdicts = write_claims(out, [tree, ablations], SEEDS, CLAIMS)
    rows = {r["claim"]: r for r in verdicts["test"]}
    assert rows["two teachers beat one"]["cls/knn_top1"] == {"mean": 20.0, "std": 0.0, "n": 3, "verdict": "holds"}
    assert rows["PEMAE beats MAE"]["cls/knn_top1"]["mean"] == 11.0  # the tree's pemae, not the shadow
    val_rows = {r["claim"]: r for r in verdicts["val"]}
    assert val_rows["two teachers beat one"]["cls/knn_top1"] == {"verdict": "not run"}  # no val figures
    text = (out / "claims.md").read_text()
    assert "## The paper's claims (test split)" in text and "## The paper's claims (validation split)" in text
    assert json.loads((out / "claims.json").read_text())["test"]["pemae-single_teacher"]["b"] == "single_teacher"
