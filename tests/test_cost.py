"""The cost measurement of the teachers (`pemae.cost`): tiny models, a few CPU steps."""

from __future__ import annotations

import math

import pytest
import torch

from pemae.config.params import build_config
from pemae.perf.step_cost import (COST_VARIANTS, build_variant, format_table, measure_step_cost,
                                  student_of, summary, teacher_parameters)

SMALL_HEAD = {"method": {"num_prototypes": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 32}}


@pytest.fixture(scope="module")
def cfg():
    return build_config("tiny", SMALL_HEAD)


@pytest.fixture(scope="module")
def rows(cfg) -> dict[str, dict]:
    out = measure_step_cost(cfg, batch_size=16, warmup=1, steps=2, device="cpu", verbose=False)
    return {r["variant"]: r for r in out}


def test_one_row_per_variant_with_positive_finite_numbers(rows):
    assert list(rows) == list(COST_VARIANTS)
    for r in rows.values():
        assert r["batch_size"] == 16 and r["device"] == "cpu"
        assert r["memory_kind"] == "cpu_step_estimate"
        for key in ("step_ms", "step_ms_min", "step_ms_max", "images_per_s", "peak_memory_mb",
                    "state_mb", "saved_mb", "throughput_vs_mae", "memory_vs_mae"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["variant"], key)
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
        assert r["images_per_s"] == pytest.approx(16 / (r["step_ms"] / 1e3))
        assert r["peak_memory_mb"] == pytest.approx(r["state_mb"] + r["saved_mb"])
        assert r["params_trainable"] > 0


def test_ratios_to_the_references(rows):
    assert rows["mae"]["throughput_vs_mae"] == 1.0 and rows["mae"]["memory_vs_mae"] == 1.0
    single, dual = rows["pemae_single"], rows["pemae_dual"]
    assert single["throughput_vs_single"] == 1.0 and single["memory_vs_single"] == 1.0
    assert dual["memory_vs_single"] == pytest.approx(dual["peak_memory_mb"] / single["peak_memory_mb"])
    assert dual["throughput_vs_mae"] == pytest.approx(dual["images_per_s"] / rows["mae"]["images_per_s"])


def test_teacher_parameters_mae_none_dual_two_copies(rows, cfg):
    assert rows["mae"]["params_teacher"] == 0
    single, dual = rows["pemae_single"], rows["pemae_dual"]
    assert dual["params_teacher"] > single["params_teacher"] > 0
    # dual = single's teacher (encoder + head) plus a second encoder copy
    encoder = sum(p.numel() for p in student_of(build_variant(cfg, COST_VARIANTS["mae"])).encoder.parameters())
    assert dual["params_teacher"] == single["params_teacher"] + encoder
    assert dual["params_trainable"] == single["params_trainable"]  # same student and heads


def test_cpu_memory_estimate_orders_dual_above_single_by_the_extra_teacher(rows):
    single, dual = rows["pemae_single"], rows["pemae_dual"]
    extra_teacher_mb = (dual["params_teacher"] - single["params_teacher"]) * 4 / 2**20  # fp32
    # same student, heads, gradients, optimiser state and saved activations; one more teacher
    assert dual["saved_mb"] == pytest.approx(single["saved_mb"])
    assert dual["state_mb"] >= single["state_mb"] + extra_teacher_mb - 1e-9  # float slack
    assert dual["peak_memory_mb"] > single["peak_memory_mb"]


def test_every_variant_starts_from_the_same_student_weights(cfg):
    students = {name: student_of(build_variant(cfg, o, seed=3)).state_dict()
                for name, o in COST_VARIANTS.items()}
    reference = students["mae"]
    for name, state in students.items():
        assert state.keys() == reference.keys(), name
        for key, value in state.items():
            assert torch.equal(value, reference[key]), (name, key)
    other = student_of(build_variant(cfg, COST_VARIANTS["mae"], seed=4)).state_dict()
    assert not torch.equal(other["decoder_embed.weight"], reference["decoder_embed.weight"])


def test_teachers_start_as_copies_of_the_student(cfg):
    model = build_variant(cfg, COST_VARIANTS["pemae_dual"])
    assert {name for name in model.teacher_set} == {"rec", "lab"}
    assert teacher_parameters(build_variant(cfg, COST_VARIANTS["mae"])) == []
    student = dict(model.student.encoder.named_parameters())
    for teacher in model.teacher_set.values():
        for key, value in teacher["encoder"].named_parameters():
            assert torch.equal(value, student[key]) and not value.requires_grad


def test_format_table_and_summary_name_every_variant(rows):
    table = format_table(list(rows.values()))
    lines = table.splitlines()
    assert lines[0].startswith("| variant |") and len(lines) == 2 + len(rows)
    for name in COST_VARIANTS:
        assert f"| {name} |" in table
    text = summary(list(rows.values()))
    assert "pemae_dual vs single" in text and "pemae_single vs mae" in text
