"""The GPU check and compute estimate (`pemae.gpu_check`), run on the CPU with the tiny preset."""

from __future__ import annotations

import json

import pytest

from pemae.config.params import build_config
from pemae.gpu_check import main
from pemae.perf.gpu import compute_estimate, flops_per_image, gpu_check, peak_tflops
from pemae.perf.step_cost import COST_VARIANTS


@pytest.fixture(scope="module")
def cfg():
    return build_config("tiny")


@pytest.fixture(scope="module")
def flops(cfg) -> dict[str, dict]:
    return {name: flops_per_image(cfg, o, variant=name) for name, o in COST_VARIANTS.items()}


def mae_forward_flops(cfg) -> int:
    """Model FLOPs of one MAE forward per image, by hand (a multiply-add = 2 FLOPs).

    Patch embedding on all N patches, encoder blocks on 1+V tokens, decoder embedding on 1+V,
    decoder blocks on 1+N, prediction head on N. A block on T tokens of width d (MLP ratio 4):
    qkv 6Td², proj 2Td², MLP 16Td², attention scores and weighted sum 4T²d.
    """
    m, d = cfg.model, cfg.data
    n = (d.img_size // m.patch_size) ** 2
    v = int(n * (1 - m.mask_ratio))
    pixels = m.patch_size**2 * d.in_chans

    def block(t: int, dim: int) -> int:
        return 24 * t * dim**2 + 4 * t**2 * dim

    return (2 * n * pixels * m.embed_dim + m.depth * block(1 + v, m.embed_dim)
            + 2 * (1 + v) * m.embed_dim * m.decoder_dim
            + m.decoder_depth * block(1 + n, m.decoder_dim) + 2 * n * m.decoder_dim * pixels)


def test_flops_positive_and_ordered(flops):
    for r in flops.values():
        assert r["train_flops_per_image"] > r["forward_flops_per_image"] > 0
    train = [flops[n]["train_flops_per_image"] for n in ("mae", "pemae_single", "pemae_dual")]
    forward = [flops[n]["forward_flops_per_image"] for n in ("mae", "pemae_single", "pemae_dual")]
    assert train == sorted(train) and len(set(train)) == 3
    assert forward == sorted(forward) and len(set(forward)) == 3


def test_mae_forward_flops_match_the_hand_formula(flops, cfg):
    # exact: attention on the CPU's fused kernel is counted too (else this would be short)
    assert flops["mae"]["forward_flops_per_image"] == mae_forward_flops(cfg)


def test_peak_lookup_by_whole_name_fragment():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA A10") == 125.0
    assert peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("NVIDIA A10G") is None and peak_tflops("cpu") is None


def test_gpu_check_on_cpu(capsys):
    rows = gpu_check(preset="tiny", device="cpu", amp="off", batch_size=8, warmup=1, steps=2,
                     peak=1.0)
    assert [r["variant"] for r in rows] == list(COST_VARIANTS)
    for r in rows:
        assert r["images_per_s"] > 0 and r["peak_memory_gib"] is None
        assert r["images_per_s"] == pytest.approx(8 / (r["step_ms"] / 1e3))
        assert r["mfu"] == pytest.approx(r["train_flops_per_image"] * r["images_per_s"] / 1e12)
    out = capsys.readouterr().out
    assert "| variant |" in out and "n/a" in out


def test_compute_estimate_arithmetic(flops):
    rows = compute_estimate("tiny", images_per_epoch=1000, epochs=3, peak_tflops=100.0, mfu=0.5,
                            verbose=False)
    half = compute_estimate("tiny", images_per_epoch=1000, epochs=3, peak_tflops=100.0, mfu=0.25,
                            verbose=False)
    for r, h in zip(rows, half):
        f = r["train_flops_per_image"]
        assert f == flops[r["variant"]]["train_flops_per_image"]
        assert r["total_flops"] == pytest.approx(f * 1000 * 3)
        assert r["gpu_hours"] == pytest.approx(f * 1000 * 3 / (100.0 * 1e12 * 0.5) / 3600)
        assert h["gpu_hours"] == pytest.approx(2 * r["gpu_hours"])
        assert r["mfu_source"] == "assumed"


def test_compute_estimate_says_the_mfu_is_assumed(capsys):
    compute_estimate("tiny", epochs=1, variants={"mae": COST_VARIANTS["mae"]})
    assert "ASSUMPTION" in capsys.readouterr().out


def test_main_prints_a_table_of_the_three_variants(capsys):
    code = main(["--preset", "tiny", "--device", "cpu", "--amp", "off", "--steps", "1",
                 "--warmup", "1", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert code == 0
    for name in COST_VARIANTS:
        assert f"| {name} |" in out


def test_main_refuses_the_paper_preset_on_the_cpu(capsys):
    assert main(["--device", "cpu"]) == 2
    assert "needs a GPU" in capsys.readouterr().out


def test_smoke_check_runs_the_real_loops_and_resumes_exactly(tmp_path):
    """`python -m pemae.gpu_check --smoke` on the CPU: pretraining killed at its first checkpoint
    resumes to the uninterrupted run's weights bit for bit; every later command writes its figures."""
    assert main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    assert row["interrupted"] is True and row["resume_max_abs_diff"] == 0.0
    assert row["steps"] == 60 and not row["collapsed"]
    for key in ("test_knn_top1", "test_linear_top1", "finetune_test_top1", "dense_test_miou"):
        assert 0 < row[key] <= 100, key
    assert "| resume_max_abs_diff | 0 |" in (tmp_path / "smoke.md").read_text()
