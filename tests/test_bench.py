"""The peer benchmark (`pemae.bench`): the tiny size, one warm-up step, one timed step, one round.

The peers (transformers, lightly) are optional: a missing one must be skipped with a note and
its rows and ratios left out; the tests that build a peer skip when its library is absent.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from pemae import bench
from pemae.config.params import build_config
from pemae.engine import runtime
from pemae.perf import benchmark, peers, step_cost
from pemae.perf.step_cost import COST_VARIANTS, build_variant

BATCH = 16
PEMAE_ROWS = ("pemae_mae", "pemae_single", "pemae_dual")


def params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    report = benchmark.run_benchmark(["tiny"], rounds=1, warmup=1, steps=1, device="cpu", out=out,
                                     batch_size=BATCH, verbose=False)
    return report, out


@pytest.fixture(scope="module")
def size(run) -> dict:
    return run[0]["sizes"][0]


@pytest.fixture(scope="module")
def rows(size) -> dict[str, dict]:
    return {r["implementation"]: r for r in size["rows"]}


def present() -> list[str]:
    return [i.name for i in peers.IMPLEMENTATIONS if i.library not in peers.MISSING]


# ------------------------------------------------------------------------------- the run
def test_one_row_per_available_implementation_the_rest_skipped_with_a_note(size, rows):
    assert list(rows) == present()
    assert set(PEMAE_ROWS) <= set(rows)
    skipped = [s["implementation"] for s in size["skipped"]]
    assert skipped == [i.name for i in peers.IMPLEMENTATIONS if i.library in peers.MISSING]
    assert all("pip install" in s["note"] for s in size["skipped"])


def test_every_figure_positive_and_consistent(rows):
    for name, r in rows.items():
        for key in ("images_per_s", "step_ms", "peak_memory_mb", "flops_per_step",
                    "achieved_gflop_s", "peak_fraction", "params_trainable"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key)
        assert r["batch_size"] == BATCH and r["memory_kind"] == "cpu_step_estimate"
        assert r["images_per_s"] == pytest.approx(BATCH / (r["step_ms"] / 1e3))
        assert r["achieved_gflop_s"] == pytest.approx(r["flops_per_step"] / r["step_ms"] / 1e6)


def test_ratios_are_the_quotients_of_the_rows(size, rows):
    expected = [f"{a} / {b}" for a, b in peers.RATIOS if a in rows and b in rows]
    assert [r["ratio"] for r in size["ratios"]] == expected
    assert "pemae_dual / pemae_single" in expected
    for ratio in size["ratios"]:
        a, b = (rows[n] for n in ratio["ratio"].split(" / "))
        assert ratio["throughput"] == pytest.approx(a["images_per_s"] / b["images_per_s"])
        assert ratio["memory"] == pytest.approx(a["peak_memory_mb"] / b["peak_memory_mb"])
        assert ratio["flops"] == pytest.approx(a["flops_per_step"] / b["flops_per_step"])


def test_flops_order_mae_single_dual_and_peers_do_the_same_work(rows):
    mae, single, dual = (rows[n]["flops_per_step"] for n in PEMAE_ROWS)
    assert dual > single > mae > 0
    # the dual teacher adds one more full-view encoder forward: at least a third of the MAE step
    assert dual - single > mae / 3
    for peer, own in (("hf_mae", mae), ("lightly_mae", mae), ("lightly_pemae", dual)):
        if peer in rows:  # the same model at the same size: the same matmuls within 1%
            assert rows[peer]["flops_per_step"] == pytest.approx(own, rel=0.01), peer


def test_teacher_parameters(rows):
    assert rows["pemae_mae"]["params_teacher"] == 0
    assert rows["pemae_dual"]["params_teacher"] > rows["pemae_single"]["params_teacher"] > 0


def test_markdown_and_json_written(run, size):
    report, out = run
    md = (out / "bench.md").read_text()
    assert "## size `tiny`" in md and "gemm peak" in md
    for r in size["rows"]:
        assert f"| {r['implementation']} |" in md
    for r in size["ratios"]:
        assert f"| {r['ratio']} |" in md
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(report))
    assert report["meta"]["gemm_peak_gflop_s"] > 0


# ------------------------------------------------------------------------------- skipping
def test_a_missing_peer_library_is_skipped_with_a_printed_note(monkeypatch, capsys):
    monkeypatch.setitem(peers.MISSING, "lightly", "No module named 'lightly'")
    kept, skipped = peers.available()
    assert [i.name for i in kept if i.library == "lightly"] == []
    assert {s["implementation"] for s in skipped} >= {"lightly_mae", "lightly_pemae"}
    assert "skipped lightly_pemae: lightly cannot be imported" in capsys.readouterr().out


def test_ratios_leave_out_pairs_with_a_missing_row():
    rows = [{"implementation": n, "images_per_s": 2.0, "peak_memory_mb": 1.0, "flops_per_step": 3}
            for n in ("pemae_mae", "pemae_single", "pemae_dual")]
    assert [r["ratio"] for r in benchmark.ratio_rows(rows)] == ["pemae_dual / pemae_single"]


def test_sizes_parse_and_the_issue_size_is_the_reported_one():
    assert bench.parse_sizes(["tiny,issue", "tiny"]) == ["tiny", "issue"]
    assert bench.parse_sizes(None) == ["issue", "default"]
    with pytest.raises(SystemExit):
        bench.parse_sizes(["huge"])
    cfg = benchmark.size_config("issue")
    d, m, h = cfg.data, cfg.model, cfg.method
    assert (cfg.pretrain.batch_size, d.img_size, d.in_chans, m.patch_size) == (128, 32, 3, 4)
    assert (m.embed_dim, m.depth, m.num_heads, m.decoder_dim, m.decoder_depth) == (192, 6, 3, 128, 2)
    assert (h.num_prototypes, h.head_hidden_dim, h.head_bottleneck_dim) == (1024, 512, 128)


# ------------------------------------------------------------------------------- fairness
@pytest.fixture(scope="module")
def tiny():
    return build_config("tiny")


def test_hf_mae_has_pemae_mae_encoder_and_trainable_parameters(tiny):
    pytest.importorskip("transformers")
    ours, hf = build_variant(tiny, COST_VARIANTS["mae"]), peers.HFMAE(tiny)
    assert params(hf.net.vit) == params(ours.encoder)  # exactly the same encoder
    # the only difference in all: HF's frozen decoder position embedding is a parameter, ours a buffer
    assert params(hf, trainable_only=True) == params(ours, trainable_only=True)
    assert params(hf) == params(ours) + ours.decoder_pos_embed.numel()


def test_lightly_peers_have_pemae_parameters_plus_the_unused_mask_token(tiny):
    pytest.importorskip("lightly")
    width = tiny.model.embed_dim  # MaskedVisionTransformerTIMM's mask token, unused by MAE
    ours, lightly = build_variant(tiny, COST_VARIANTS["mae"]), peers.LightlyMAE(tiny)
    assert params(lightly.backbone.vit) == params(ours.encoder)  # the same timm ViT
    assert params(lightly.backbone) == params(ours.encoder) + width
    assert params(lightly, trainable_only=True) == params(ours, trainable_only=True) + width

    dual, lightly_pemae = build_variant(tiny, COST_VARIANTS["pemae_dual"]), peers.LightlyPEMAE(tiny)
    assert (params(lightly_pemae, trainable_only=True)
            == params(dual, trainable_only=True) + width)  # same student, token head, DINO head
    assert (sum(p.numel() for p in lightly_pemae.teacher_set.parameters())
            == sum(p.numel() for p in dual.teacher_set.parameters()) + 2 * width)  # two backbones


# ------------------------------------------------------------------------------- --compile
def test_compiling_a_contender_records_its_compile_time_and_keeps_training():
    cfg = benchmark.size_config("tiny")
    imgs = step_cost.fixed_batch(cfg, BATCH)
    contender = peers.pemae_builder(COST_VARIANTS["mae"])(cfg, imgs, runtime.pick_device("cpu"), "off", 0)
    before = {k: v.clone() for k, v in contender.model.state_dict().items()}
    rows = {"pemae_mae": {}}
    benchmark.compile_contenders({"pemae_mae": contender}, rows)
    assert rows["pemae_mae"]["compile_s"] > 0
    after = contender.model.state_dict()
    assert after.keys() == before.keys()  # compiled in place: same module, same keys
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the compiled step trained
    assert math.isfinite(float(contender.run_step()["loss"]))
