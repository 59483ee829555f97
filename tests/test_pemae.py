"""Unit tests of PEMAE (pemae.models.pemae / teachers / losses / heads): EMA teachers, single vs dual
teachers, Sinkhorn and centering, the λ switches, frozen prototypes, the multifold teacher view,
the config cross-checks, the untouched MAE path, and tiny end-to-end pretraining of every
ablation variant. Tiny models, batches of a few random 1x28x28 images, K = 64 prototypes."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import needs_fashion_mnist, run_pretrain, tiny_config
from pemae.config.params import build_config
from pemae.config.schema import ConfigError
from pemae.engine.optim import param_groups
from pemae.engine.pretrain import train_step
from pemae.engine.runtime import read_log
from pemae.engine.schedules import teacher_temperature
from pemae.engine.schedules import ema_momentum
from pemae.models.encoder import build_encoder, encode_patches, gather_tokens
from pemae.models.heads import LabellingHead
from pemae.models.losses import centered_probs, pseudo_label_loss, sinkhorn_knopp, update_center
from pemae.models.mae import MaskedAutoencoder, random_masking
from pemae.models.monitors import (COLLAPSED_TARGET_RANK, COLLAPSED_TARGET_STD, MAX_RANK_ROWS,
                                   collapse_report, effective_rank, target_monitors)
from pemae.models.pemae import PEMAE, build_pretrain_model, teacher_features
from pemae.models.teachers import EMATeacher

SMALL_HEAD = {"num_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box OpenMP contention
    slows them down tenfold; restore the setting for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pemae_cfg(**method):
    return tiny_config(method={**SMALL_HEAD, **method})


def build(cfg, total_steps: int = 10, steps_per_epoch: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_pretrain_model(cfg, total_steps, steps_per_epoch)


def images(b: int = 4, seed: int = 123) -> torch.Tensor:
    return torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def forward_backward(model: nn.Module, imgs: torch.Tensor, seed: int = 1, step: int = 0) -> dict:
    """One forward (masking drawn under `seed`) and backward from zeroed gradients."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(imgs, step)
    out["loss"].backward()
    return out


def grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()}


def is_zero_grad(g: torch.Tensor | None) -> bool:
    return g is None or not g.any()


def perturb_(module: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter (as an optimiser would), so student and teacher differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def ptrs(module: nn.Module) -> set[int]:
    return {p.data_ptr() for p in module.parameters()}


# --------------------------------------------------------------------------------------------
# 1. EMA update and momentum schedule
# --------------------------------------------------------------------------------------------
def student_parts() -> dict[str, nn.Module]:
    cfg = pemae_cfg()
    torch.manual_seed(0)
    return {"encoder": build_encoder(cfg.model, cfg.data),
            "head": LabellingHead(cfg.model.embed_dim, 64, 32, 16, 3)}


@pytest.mark.parametrize("m", [0.0, 0.5, 0.9, 0.996, 1.0])
def test_ema_update_is_the_exact_lerp_of_every_parameter(m):
    students = student_parts()
    teacher = EMATeacher(**students)
    for i, s in enumerate(students.values()):
        perturb_(s, seed=i)  # the student moved away from the teacher
    before_t = {k: snapshot(teacher[k]) for k in students}
    before_s = {k: snapshot(s) for k, s in students.items()}
    teacher.update(m, **students)
    checked = 0
    for k, s in students.items():
        t_params = dict(teacher[k].named_parameters())
        s_params = dict(s.named_parameters())
        assert t_params.keys() == s_params.keys()
        for name, t in t_params.items():
            expected = m * before_t[k][name] + (1 - m) * before_s[k][name]
            assert torch.allclose(t, expected, rtol=1e-5, atol=1e-6), f"{k}.{name}"
            assert not t.requires_grad, f"{k}.{name}"
            checked += 1
        for name, t in s.state_dict().items():  # the student is untouched, bit for bit
            assert torch.equal(t, before_s[k][name]), f"student {k}.{name} changed"
    assert checked == sum(len(list(s.parameters())) for s in students.values())
    assert checked > 10


def test_ema_update_also_follows_floating_buffers_but_not_integer_ones():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))
    student.train()(torch.randn(16, 3))  # moves running stats, counts a batch
    teacher = EMATeacher(net=nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5)))
    bn_t, bn_s = teacher["net"][1], student[1]
    mean_before = bn_t.running_mean.clone()
    teacher.update(0.75, net=student)
    assert torch.allclose(bn_t.running_mean, 0.75 * mean_before + 0.25 * bn_s.running_mean)
    assert bn_t.num_batches_tracked.item() == 0 and bn_s.num_batches_tracked.item() == 1


def test_ema_teacher_is_a_frozen_copy_with_its_own_storage():
    students = student_parts()
    teacher = EMATeacher(**students)
    for k, s in students.items():
        assert not ptrs(teacher[k]) & ptrs(s)
        for (n, t), (_, p) in zip(teacher[k].named_parameters(), s.named_parameters()):
            assert torch.equal(t, p), n
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.training and all(not mod.training for mod in teacher.modules())


def test_ema_update_with_other_parts_is_an_error():
    students = student_parts()
    teacher = EMATeacher(**students)
    with pytest.raises(ValueError, match="head"):
        teacher.update(0.9, encoder=students["encoder"])


def test_ema_momentum_is_base_at_start_one_at_the_end_and_monotone():
    total, base = 37, 0.99
    values = [ema_momentum(s, total, base) for s in range(total + 5)]
    assert values[0] == pytest.approx(base, abs=1e-12)
    assert values[total] == pytest.approx(1.0, abs=1e-12)
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in values[total:])  # clamped after the end
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert all(base <= v <= 1.0 for v in values)
    # cosine: half way at half time
    assert ema_momentum(50, 100, base) == pytest.approx(1 - (1 - base) / 2)
    assert ema_momentum(0, 0, base) == pytest.approx(base)  # no steps: no division by zero


def test_teacher_temperature_warms_up_linearly_then_stays():
    assert teacher_temperature(0, 100, 0.04, 0.07, 0.3) == pytest.approx(0.04)
    assert teacher_temperature(15, 100, 0.04, 0.07, 0.3) == pytest.approx(0.055)
    assert teacher_temperature(30, 100, 0.04, 0.07, 0.3) == pytest.approx(0.07)
    assert teacher_temperature(99, 100, 0.04, 0.07, 0.3) == pytest.approx(0.07)
    assert teacher_temperature(0, 100, 0.04, 0.07, 0.0) == pytest.approx(0.07)


# --------------------------------------------------------------------------------------------
# 2. Teachers: eval mode, no gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("teachers", ["dual", "single"])
def test_teachers_stay_in_eval_mode_and_get_no_gradient(teachers):
    model = build(pemae_cfg(teachers=teachers))
    assert isinstance(model, PEMAE)
    model.eval()
    model.train()
    assert model.training and model.student.training and model.label_head.training
    assert len(model.teacher_set) == (2 if teachers == "dual" else 1)
    for name, teacher in model.teacher_set.items():
        assert isinstance(teacher, EMATeacher)
        assert not teacher.training, name
        assert all(not mod.training for mod in teacher.modules()), name
        assert all(not p.requires_grad for p in teacher.parameters()), name

    out = forward_backward(model, images())
    assert torch.isfinite(out["loss"])
    for name, p in model.teacher_set.named_parameters():
        assert p.grad is None, name
    # every trainable student parameter gets a gradient; MAE's pixel head is unused here
    missing = {n for n, p in model.named_parameters()
               if p.requires_grad and not n.startswith("teacher_set.") and is_zero_grad(p.grad)}
    assert missing <= {"student.decoder_pred.weight", "student.decoder_pred.bias"}, missing
    assert not is_zero_grad(model.label_head.last_layer.parametrizations.weight.original1.grad)
    assert not is_zero_grad(model.token_head.weight.grad)
    assert not is_zero_grad(model.student.encoder.blocks[0].attn.qkv.weight.grad)


# --------------------------------------------------------------------------------------------
# 3. Single vs dual teachers
# --------------------------------------------------------------------------------------------
def test_single_has_one_teacher_with_both_parts():
    model = build(pemae_cfg(teachers="single"))
    assert list(model.teacher_set) == ["shared"]
    assert model.rec_teacher is model.lab_teacher is model.teacher_set["shared"]
    assert set(model.teacher_set["shared"].parts) == {"encoder", "head"}
    teacher_ptrs = [p.data_ptr() for p in model.teacher_set.parameters()]
    assert len(teacher_ptrs) == len(set(teacher_ptrs))
    n_student = len(list(model.student.encoder.parameters())) + len(list(model.label_head.parameters()))
    assert len(teacher_ptrs) == n_student  # one copy of encoder + head, no more
    assert not set(teacher_ptrs) & ptrs(model.student) and not set(teacher_ptrs) & ptrs(model.label_head)


def test_dual_has_two_distinct_teachers():
    model = build(pemae_cfg(teachers="dual"))
    assert set(model.teacher_set) == {"rec", "lab"}
    rec, lab = model.teacher_set["rec"], model.teacher_set["lab"]
    assert model.rec_teacher is rec and model.lab_teacher is lab and rec is not lab
    assert set(rec.parts) == {"encoder"} and set(lab.parts) == {"encoder", "head"}
    assert not ptrs(rec) & ptrs(lab)
    assert not (ptrs(rec) | ptrs(lab)) & ptrs(model.student)
    assert not ptrs(lab) & ptrs(model.label_head)
    # both start as exact copies of the (initialised) student
    for teacher in (rec, lab):
        for (n, t), (_, p) in zip(teacher["encoder"].named_parameters(),
                                  model.student.encoder.named_parameters()):
            assert torch.equal(t, p), n
    for (n, t), (_, p) in zip(lab["head"].named_parameters(), model.label_head.named_parameters()):
        assert torch.equal(t, p), n


@pytest.mark.parametrize("teachers,calls", [("single", {"shared": 1}), ("dual", {"rec": 1, "lab": 1})])
@pytest.mark.parametrize("view", ["full", "multifold"])
def test_teacher_encoder_passes_per_step(teachers, calls, view):
    folds = 3
    model = build(pemae_cfg(teachers=teachers, teacher_view=view, folds=folds)).train()
    counts = {name: 0 for name in model.teacher_set}

    def counter(name):
        def hook(*_):
            counts[name] += 1
        return hook

    for name, teacher in model.teacher_set.items():
        teacher["encoder"].blocks.register_forward_hook(counter(name))
    steps = 3
    for step in range(steps):
        with torch.no_grad():
            torch.manual_seed(step)
            model(images(), step)
    per_pass = 1 if view == "full" else folds
    assert counts == {k: v * steps * per_pass for k, v in calls.items()}


def test_dual_teachers_follow_their_own_momentum():
    m_rec, m_lab, total = 0.5, 0.9, 4
    model = build(pemae_cfg(teachers="dual", momentum_rec=m_rec, momentum_lab=m_lab), total_steps=total)
    rec, lab = model.teacher_set["rec"], model.teacher_set["lab"]
    exp_rec = snapshot(rec["encoder"])
    exp_lab = {"encoder": snapshot(lab["encoder"]), "head": snapshot(lab["head"])}
    assert all(torch.equal(exp_rec[k], exp_lab["encoder"][k]) for k in exp_rec)  # same start
    for step in range(3):
        perturb_(model.student.encoder, seed=10 + step)
        perturb_(model.label_head, seed=20 + step)
        s_enc, s_head = dict(model.student.encoder.named_parameters()), dict(model.label_head.named_parameters())
        mr, ml = ema_momentum(step, total, m_rec), ema_momentum(step, total, m_lab)
        assert model.momentum("rec", step) == pytest.approx(mr)
        assert model.momentum("lab", step) == pytest.approx(ml)
        for k in s_enc:
            exp_rec[k] = mr * exp_rec[k] + (1 - mr) * s_enc[k].detach()
            exp_lab["encoder"][k] = ml * exp_lab["encoder"][k] + (1 - ml) * s_enc[k].detach()
        for k in s_head:
            exp_lab["head"][k] = ml * exp_lab["head"][k] + (1 - ml) * s_head[k].detach()
        model.after_step(step)
    for k, t in rec["encoder"].named_parameters():
        assert torch.allclose(t, exp_rec[k], rtol=1e-5, atol=1e-6), k
    for part in ("encoder", "head"):
        for k, t in lab[part].named_parameters():
            assert torch.allclose(t, exp_lab[part][k], rtol=1e-5, atol=1e-6), (part, k)
    w_rec = rec["encoder"].blocks[0].attn.qkv.weight
    w_lab = lab["encoder"].blocks[0].attn.qkv.weight
    assert not torch.allclose(w_rec, w_lab)
    out = model(images(), 1)
    assert out["momentum_rec"].item() == pytest.approx(ema_momentum(1, total, m_rec))
    assert out["momentum_lab"].item() == pytest.approx(ema_momentum(1, total, m_lab))


@pytest.mark.parametrize("labels,knob", [(True, "momentum_lab"), (False, "momentum_rec")])
def test_single_teacher_follows_the_labelling_momentum_when_it_labels(labels, knob):
    lambdas = {} if labels else {"lambda_cls": 0.0, "lambda_tok": 0.0}
    model = build(pemae_cfg(teachers="single", momentum_rec=0.5, momentum_lab=0.9, **lambdas))
    m = 0.9 if knob == "momentum_lab" else 0.5
    teacher = model.teacher_set["shared"]
    assert set(teacher.parts) == ({"encoder", "head"} if labels else {"encoder"})
    before = snapshot(teacher["encoder"])
    perturb_(model.student.encoder, seed=3)
    model.after_step(0)
    for k, t in teacher["encoder"].named_parameters():
        s = dict(model.student.encoder.named_parameters())[k]
        assert torch.allclose(t, m * before[k] + (1 - m) * s.detach(), rtol=1e-5, atol=1e-6), k


# --------------------------------------------------------------------------------------------
# 4. Sinkhorn-Knopp
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,temp,iterations,tol", [
    ((256, 64), 1.0, 3, 0.02),  # mild logits: 3 iterations are already balanced
    ((64, 256), 1.0, 3, 0.02),  # fewer samples than prototypes
    ((256, 64), 0.1, 200, 1e-3),  # peaky logits need more iterations, but converge
    ((4, 37, 16), 1.0, 3, 0.02),  # tokens: [B, M, K]
    ((4, 37, 16), 0.1, 200, 1e-3),
])
def test_sinkhorn_rows_are_distributions_and_columns_balanced(shape, temp, iterations, tol):
    torch.manual_seed(0)
    logits = torch.randn(shape)
    q = sinkhorn_knopp(logits, temp, iterations)
    assert q.shape == logits.shape
    assert (q >= 0).all()
    assert torch.allclose(q.sum(-1), torch.ones(shape[:-1]), atol=1e-5)
    flat = q.reshape(-1, shape[-1])
    samples, k = flat.shape
    cols = flat.sum(0)
    assert torch.allclose(cols, torch.full((k,), samples / k), rtol=tol), (cols / (samples / k)).aminmax()


def test_sinkhorn_is_a_diagonal_scaling_and_shift_invariant():
    torch.manual_seed(0)
    logits = torch.randn(32, 8)
    # head logits are cosines in [-1, 1]; a common offset would overflow exp without the max shift
    cosines = torch.rand(32, 8) * 2 - 1
    q = sinkhorn_knopp(cosines + 10, 0.04, 3)  # exp(260) overflows float32
    assert torch.isfinite(q).all()
    assert torch.allclose(q, sinkhorn_knopp(cosines, 0.04, 3), rtol=1e-3, atol=1e-6)
    q = sinkhorn_knopp(logits, 1.0, 3)
    # a diagonal scaling of exp(logits / T): log q - logits / T = a_sample + b_prototype
    d = q.log() - logits
    assert torch.allclose(d - d[:, :1] - d[:1, :] + d[0, 0], torch.zeros_like(d), atol=1e-4)


def test_model_with_sinkhorn_leaves_the_centres_alone():
    model = build(pemae_cfg(balancing="sinkhorn")).train()
    out = forward_backward(model, images())
    model.after_step(0)
    assert torch.isfinite(out["loss"])
    assert not model.center_cls.any() and not model.center_tok.any()


# --------------------------------------------------------------------------------------------
# 5. Centering
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [0.0, 0.9, 1.0])
def test_update_center_moves_towards_the_batch_mean(m):
    torch.manual_seed(0)
    center = torch.randn(1, 16)
    logits = torch.randn(4, 7, 16) + 3
    before = center.clone()
    update_center(center, logits, m)
    expected = m * before + (1 - m) * logits.reshape(-1, 16).mean(0)
    assert torch.allclose(center, expected, atol=1e-6)
    if 0 < m < 1:
        target = logits.reshape(-1, 16).mean(0)
        assert (center - target).norm() < (before - target).norm()


def test_centered_probs_are_the_softmax_of_shifted_scaled_logits():
    torch.manual_seed(0)
    logits, center = torch.randn(5, 16), torch.randn(1, 16)
    q = centered_probs(logits, center, 0.05)
    assert torch.allclose(q, F.softmax((logits - center) / 0.05, dim=-1))


def test_centres_move_after_a_training_step_and_not_in_eval():
    model = build(pemae_cfg())
    imgs = images()
    model.train()
    with torch.no_grad():
        model(imgs, 0)
    assert not model.center_cls.any() and not model.center_tok.any()  # not within the step
    model.after_step(0)
    c_cls, c_tok = model.center_cls.clone(), model.center_tok.clone()
    assert c_cls.any() and c_tok.any()
    assert not torch.equal(c_cls, c_tok)  # separate centres
    with torch.no_grad():
        model(imgs, 1)
    model.after_step(1)
    assert not torch.equal(model.center_cls, c_cls) and not torch.equal(model.center_tok, c_tok)
    c_cls, c_tok = model.center_cls.clone(), model.center_tok.clone()
    model.eval()
    with torch.no_grad():
        model(imgs, 2)
    model.after_step(2)
    assert torch.equal(model.center_cls, c_cls) and torch.equal(model.center_tok, c_tok)


def test_centre_update_of_two_micro_batches_equals_one_batch_of_both():
    """Accumulation: the centres after a step of two halves equal those after one whole batch."""
    imgs, noise = images(), torch.rand(len(images()), 49, generator=torch.Generator().manual_seed(3))
    whole, halves = build(pemae_cfg()).train(), build(pemae_cfg()).train()
    with torch.no_grad():
        whole(imgs, 0, noise=noise)
        for part, part_noise in zip(imgs.chunk(2), noise.chunk(2)):
            halves(part, 0, noise=part_noise)
    whole.after_step(0), halves.after_step(0)
    assert whole.center_cls.any()
    assert torch.allclose(whole.center_cls, halves.center_cls, atol=1e-6)
    assert torch.allclose(whole.center_tok, halves.center_tok, atol=1e-6)


def test_centre_update_uses_the_teacher_logits_of_that_step():
    """c_cls after one step = (1 - m)·mean of the labelling teacher's CLS logits (from c = 0)."""
    model = build(pemae_cfg(center_momentum=0.9)).train()
    imgs = images()
    with torch.no_grad():
        torch.manual_seed(5)
        model(imgs, 0)
        model.after_step(0)
        torch.manual_seed(5)
        masking = random_masking(imgs.shape[0], model.student.num_patches, model.student.mask_ratio)
        cls, tokens = teacher_features(model.lab_teacher["encoder"], imgs, masking, "full", 1)
        head = model.lab_teacher["head"]
    assert torch.allclose(model.center_cls, 0.1 * head(cls).mean(0, keepdim=True), atol=1e-6)
    assert torch.allclose(model.center_tok, 0.1 * head(tokens).reshape(-1, 64).mean(0, keepdim=True),
                          atol=1e-6)


# --------------------------------------------------------------------------------------------
# 6. λ = 0 sends no gradient
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("teachers", ["single", "dual"])
def test_no_pseudo_labels_means_no_labelling_head(teachers):
    model = build(pemae_cfg(teachers=teachers, lambda_cls=0.0, lambda_tok=0.0))
    assert model.label_head is None
    assert all("head" not in t.parts for t in model.teacher_set.values())
    assert list(model.teacher_set) == (["shared"] if teachers == "single" else ["rec"])
    out = forward_backward(model, images())
    assert not {"loss_cls", "loss_tok", "cls_entropy", "tok_entropy"} & set(out)
    assert torch.equal(out["loss"], out["loss_rec"])


def test_lambda_tok_zero_leaves_token_head_and_decoder_with_the_reconstruction_gradient():
    imgs = images()
    with_cls = build(pemae_cfg(lambda_tok=0.0))
    recon_only = build(pemae_cfg(lambda_cls=0.0, lambda_tok=0.0))
    # same seed, same construction order: identical students
    for (n, a), (_, b) in zip(with_cls.student.named_parameters(), recon_only.student.named_parameters()):
        assert torch.equal(a, b), n
    out_a = forward_backward(with_cls, imgs)
    out_b = forward_backward(recon_only, imgs)
    assert torch.equal(out_a["loss_rec"], out_b["loss_rec"])  # same masking, same targets
    assert "loss_tok" not in out_a and "loss_cls" in out_a
    for module in ("token_head", "student.decoder_blocks", "student.decoder_embed"):
        ga, gb = grads(with_cls.get_submodule(module)), grads(recon_only.get_submodule(module))
        for n in ga:
            assert ga[n] is not None and not is_zero_grad(ga[n]), (module, n)
            assert torch.allclose(ga[n], gb[n], rtol=1e-6, atol=1e-9), (module, n)
    # ... while the encoder does get the extra CLS gradient
    assert not torch.allclose(with_cls.student.encoder.cls_token.grad, recon_only.student.encoder.cls_token.grad)


def test_label_head_gradient_comes_only_from_the_cls_path_when_lambda_tok_is_zero():
    imgs = images()
    a = build(pemae_cfg(lambda_tok=0.0, lambda_rec=1.0))
    b = build(pemae_cfg(lambda_tok=0.0, lambda_rec=0.0))
    forward_backward(a, imgs)
    forward_backward(b, imgs)
    ga, gb = grads(a.label_head), grads(b.label_head)
    for n in ga:
        if n.endswith("original0"):
            assert ga[n] is None and gb[n] is None  # the prototype norms never learn
            continue
        assert not is_zero_grad(ga[n]), n
        assert torch.allclose(ga[n], gb[n], rtol=1e-6, atol=1e-9), n


def test_cls_labels_only_send_nothing_to_token_head_or_decoder():
    model = build(pemae_cfg(lambda_rec=0.0, lambda_tok=0.0, lambda_cls=1.0))
    out = forward_backward(model, images())
    assert torch.isfinite(out["loss"]) and "loss_tok" not in out
    for module in (model.token_head, model.student.decoder_embed, model.student.decoder_blocks,
                   model.student.decoder_norm, model.student.decoder_pred):
        for n, g in grads(module).items():
            assert is_zero_grad(g), n
    assert is_zero_grad(model.student.mask_token.grad)
    assert not is_zero_grad(model.student.encoder.blocks[0].attn.qkv.weight.grad)
    assert not is_zero_grad(model.label_head.mlp[0].weight.grad)


def test_lambda_cls_zero_sends_nothing_through_the_cls_path():
    """With λ_cls = 0 the loss equals λ_rec·L_rec + λ_tok·L_tok and the CLS centre never moves."""
    model = build(pemae_cfg(lambda_cls=0.0)).train()
    out = forward_backward(model, images())
    assert "loss_cls" not in out and "loss_tok" in out
    assert torch.allclose(out["loss"], out["loss_rec"] + out["loss_tok"])
    model.after_step(0)
    assert not model.center_cls.any() and model.center_tok.any()


def test_token_labels_send_gradient_through_the_predicted_tokens():
    """s_tok = H(y): with λ_tok > 0 the token head and decoder learn from the token labels too."""
    imgs = images()
    with_tok, without_tok = build(pemae_cfg()), build(pemae_cfg(lambda_tok=0.0))
    forward_backward(with_tok, imgs)
    forward_backward(without_tok, imgs)
    assert not torch.allclose(with_tok.token_head.weight.grad, without_tok.token_head.weight.grad)
    tok_only = build(pemae_cfg(lambda_rec=0.0, lambda_cls=0.0, lambda_tok=1.0))
    forward_backward(tok_only, imgs)
    assert not is_zero_grad(tok_only.token_head.weight.grad)
    assert not is_zero_grad(tok_only.student.decoder_blocks[0].mlp.fc1.weight.grad)


def test_pseudo_label_loss_is_the_cross_entropy():
    torch.manual_seed(0)
    s, q = torch.randn(3, 5, 16), F.softmax(torch.randn(3, 5, 16), -1)
    expected = -(q * F.log_softmax(s / 0.1, -1)).sum(-1).mean()
    assert torch.allclose(pseudo_label_loss(s, q, 0.1), expected)
    # minimised (over q-consistent students) when the student matches the teacher
    assert pseudo_label_loss(q.log() * 0.1, q, 0.1) < pseudo_label_loss(s, q, 0.1)


def test_dual_losses_match_a_hand_computation_from_the_right_teachers():
    """Targets from the reconstruction teacher, labels from the labelling teacher (made different)."""
    model = build(pemae_cfg(teacher_temp_start=0.05, student_temp=0.2), total_steps=10).train()
    perturb_(model.teacher_set["rec"], seed=1)
    perturb_(model.teacher_set["lab"], seed=2)
    imgs, student = images(), model.student
    torch.manual_seed(4)
    out = model(imgs, 0)
    with torch.no_grad():
        torch.manual_seed(4)
        masking = random_masking(imgs.shape[0], student.num_patches, student.mask_ratio)
        latent = student.forward_encoder(imgs, masking)
        y = model.token_head(gather_tokens(student.forward_decoder(latent, masking), masking.ids_masked))
        _, t_rec = teacher_features(model.teacher_set["rec"]["encoder"], imgs, masking, "full", 1)
        cls_lab, t_lab = teacher_features(model.teacher_set["lab"]["encoder"], imgs, masking, "full", 1)
        head_t = model.teacher_set["lab"]["head"]
        q_cls = F.softmax(head_t(cls_lab) / 0.05, -1)  # centres start at 0
        q_tok = F.softmax(head_t(t_lab) / 0.05, -1)
        loss_rec = F.mse_loss(y, t_rec)
        loss_cls = pseudo_label_loss(model.label_head(latent[:, 0]), q_cls, 0.2)
        loss_tok = pseudo_label_loss(model.label_head(y), q_tok, 0.2)
    assert torch.allclose(out["loss_rec"], loss_rec, rtol=1e-5)
    assert torch.allclose(out["loss_cls"], loss_cls, rtol=1e-5)
    assert torch.allclose(out["loss_tok"], loss_tok, rtol=1e-5)
    assert out["teacher_temp"].item() == pytest.approx(0.05)
    # the other teacher would have given other numbers
    with torch.no_grad():
        _, t_other = teacher_features(model.teacher_set["lab"]["encoder"], imgs, masking, "full", 1)
    assert not torch.allclose(F.mse_loss(y, t_other), loss_rec, rtol=1e-3)


def test_loss_is_the_lambda_weighted_sum():
    model = build(pemae_cfg(lambda_rec=0.5, lambda_cls=2.0, lambda_tok=0.25)).train()
    out = forward_backward(model, images())
    expected = 0.5 * out["loss_rec"] + 2.0 * out["loss_cls"] + 0.25 * out["loss_tok"]
    assert torch.allclose(out["loss"].detach(), expected)


@pytest.mark.parametrize("method", [
    {},
    {"teachers": "single"},
    {"recon_target": "pixel", "lambda_tok": 0.0},
    {"lambda_cls": 0.0, "balancing": "sinkhorn", "recon_loss": "cosine"},
    {"teachers": "single", "lambda_cls": 0.0, "lambda_tok": 0.0},
], ids=["dual", "single", "pixel", "tok-only", "recon-only"])
def test_step_pieces_reproduce_the_loss_terms_of_forward(method):
    """`step_pieces` (what the walkthrough notebook shows) gives exactly the terms `forward` returns,
    and looking at a step in eval mode leaves the centres' statistics alone."""
    from pemae.models.losses import token_reconstruction_loss

    model = build(pemae_cfg(**{"lambda_rec": 0.5, "lambda_cls": 2.0, **method}))
    perturb_(model.teacher_set, seed=3)  # teachers apart from the student (and from each other)
    m, imgs = model.method, images()
    noise = torch.rand(len(imgs), 49, generator=torch.Generator().manual_seed(0))  # [B, N]
    with torch.no_grad():
        out = model.train()(imgs, 3, noise=noise)
        recorded = {k: len(v) for k, v in model._step_logit_means.items()}
        p = model.eval().step_pieces(imgs, 3, noise)
    assert {k: len(v) for k, v in model._step_logit_means.items()} == recorded
    assert torch.equal(p.masking.mask, out["mask"])
    assert p.latent.shape == (4, 1 + 12, 64) and p.decoded.shape == (4, 49, 32)  # V = 12 of N = 49
    if model.token_target:
        assert p.y.shape == p.targets.shape == (4, 37, 64)  # [B, M, D]
        loss_rec = token_reconstruction_loss(p.y, p.targets, m.recon_loss)
    else:
        assert p.targets is None and p.y.shape == (4, 49, 16)  # [B, N, p*p*C]
        loss_rec = model.student.forward_loss(imgs, p.y, p.masking.mask)
    assert torch.equal(loss_rec, out["loss_rec"])
    loss = m.lambda_rec * loss_rec
    for kind, weight in (("cls", m.lambda_cls), ("tok", m.lambda_tok)):
        q, s = getattr(p, f"q_{kind}"), getattr(p, f"s_{kind}")
        assert (q is None) == (s is None) == (weight == 0) == (f"loss_{kind}" not in out)
        if weight:
            term = pseudo_label_loss(s, q, m.student_temp)
            assert torch.equal(term, out[f"loss_{kind}"])
            loss = loss + weight * term
    assert torch.equal(loss, out["loss"])
    assert p.teacher_temp == pytest.approx(out["teacher_temp"].item())


# --------------------------------------------------------------------------------------------
# 7. Frozen prototypes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epochs,steps_per_epoch,frozen", [(1.0, 2, 2), (0.5, 4, 2), (0.0, 2, 0)])
def test_prototypes_are_frozen_for_the_first_epochs(epochs, steps_per_epoch, frozen):
    model = build(pemae_cfg(freeze_last_layer_epochs=epochs), total_steps=8,
                  steps_per_epoch=steps_per_epoch).train()
    assert model.freeze_last_layer_steps == frozen
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    last = model.label_head.last_layer
    v, g = last.parametrizations.weight.original1, last.parametrizations.weight.original0
    imgs = images()
    changed_v, changed_mlp = [], []
    for step in range(frozen + 2):
        v_before, mlp_before = v.detach().clone(), model.label_head.mlp[0].weight.detach().clone()
        terms = train_step(model, optimizer, imgs, CPU, step)
        assert math.isfinite(terms["loss"].item())
        changed_v.append(not torch.equal(v, v_before))
        changed_mlp.append(not torch.equal(model.label_head.mlp[0].weight, mlp_before))
    assert changed_v == [False] * frozen + [True, True]
    assert all(changed_mlp)  # the rest of the head trains from the start
    assert torch.equal(g, torch.ones_like(g)) and not g.requires_grad
    g_teacher = model.teacher_set["lab"]["head"].last_layer.parametrizations.weight.original0
    assert torch.equal(g_teacher, torch.ones_like(g_teacher))
    # prototypes stay unit vectors: the effective weight has unit rows
    assert torch.allclose(last.weight.norm(dim=1), torch.ones(64), atol=1e-5)


# --------------------------------------------------------------------------------------------
# 8. The MAE path is untouched
# --------------------------------------------------------------------------------------------
def test_mae_method_builds_the_plain_masked_autoencoder_with_identical_loss():
    cfg = tiny_config(method={"name": "mae"})
    model = build(cfg, seed=7)
    assert type(model) is MaskedAutoencoder
    torch.manual_seed(7)
    plain = MaskedAutoencoder(cfg.model, cfg.data)
    sa, sb = model.state_dict(), plain.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    imgs = images(8)
    torch.manual_seed(3)
    out_a = model(imgs, 0)
    torch.manual_seed(3)
    out_b = plain(imgs, 0)
    assert torch.equal(out_a["loss"], out_b["loss"])
    assert torch.equal(out_a["mask"], out_b["mask"])
    assert set(out_a) == {"loss", "loss_rec", "pred", "mask"}


@needs_fashion_mnist
def test_mae_pretraining_is_reproducible(tmp_path):
    cfg = tiny_config(method={"name": "mae"}, data={"train_subset": 128}, pretrain={"batch_size": 32})
    a = run_pretrain(cfg, tmp_path / "a")
    b = run_pretrain(cfg, tmp_path / "b")
    assert a.summary["steps"] == 4
    assert a.summary["final_loss"] == b.summary["final_loss"]
    la, lb = read_log(a.out_dir / "log.csv"), read_log(b.out_dir / "log.csv")
    assert np.array_equal(la["loss"], lb["loss"])
    assert set(la) == {"step", "epoch", "lr", "images_per_s", "peak_mem_mb", "skipped_images",
                       "loss", "loss_rec"}


# --------------------------------------------------------------------------------------------
# 9. Every ablation variant pretrains end to end
# --------------------------------------------------------------------------------------------
MONITORS = ("entropy", "perplexity", "information", "center_norm")
VARIANTS = {
    "mae": ({"name": "mae"}, set(), set()),
    "token_recon_only": ({"teachers": "single", "lambda_cls": 0, "lambda_tok": 0}, set(), {"shared"}),
    "cls_labels": ({"teachers": "dual", "lambda_tok": 0}, {"cls"}, {"rec", "lab"}),
    "single": ({"teachers": "single"}, {"cls", "tok"}, {"shared"}),
    "dual": ({"teachers": "dual"}, {"cls", "tok"}, {"rec", "lab"}),
    "sinkhorn": ({"balancing": "sinkhorn"}, {"cls", "tok"}, {"rec", "lab"}),
    "multifold": ({"teacher_view": "multifold"}, {"cls", "tok"}, {"rec", "lab"}),
    "cosine": ({"recon_loss": "cosine"}, {"cls", "tok"}, {"rec", "lab"}),
    "pixel": ({"recon_target": "pixel", "lambda_tok": 0}, {"cls"}, {"lab"}),
    "two_views": ({"views": 2}, {"cls", "tok"}, {"rec", "lab"}),
}


@needs_fashion_mnist
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_pretrains_and_logs_its_terms(variant, tmp_path):
    method, kinds, teachers = VARIANTS[variant]
    if method.get("name") != "mae":
        method = {**SMALL_HEAD, **method}
    cfg = tiny_config(method=method, data={"train_subset": 128}, pretrain={"batch_size": 32})
    run = run_pretrain(cfg, tmp_path)
    log = read_log(run.out_dir / "log.csv")
    assert run.summary["steps"] == 4 and len(log["step"]) == 4
    assert math.isfinite(run.summary["final_loss"])
    expected = {"loss", "loss_rec"} | {f"loss_{k}" for k in kinds}
    expected |= {f"{k}_{mon}" for k in kinds for mon in MONITORS}
    expected |= {f"momentum_{t}" for t in teachers}
    token_targets = variant not in ("mae", "pixel")
    if token_targets:
        expected |= {"target_std", "target_rank"}
    if variant != "mae":
        expected.add("teacher_temp")
    extra = {"step", "epoch", "lr", "images_per_s", "peak_mem_mb", "skipped_images"}
    assert set(log) == expected | extra
    for col in expected:
        assert np.isfinite(log[col]).all(), col
    for k in kinds:
        assert (log[f"{k}_entropy"] >= 0).all() and (log[f"{k}_entropy"] <= math.log(64) + 1e-4).all()
        assert ((log[f"{k}_perplexity"] >= 1 - 1e-4) & (log[f"{k}_perplexity"] <= 64 + 1e-3)).all()
        norms = log[f"{k}_center_norm"]
        # the centre starts at 0 and moves after each step (the monitor shows the one used)
        assert (norms == 0).all() if variant == "sinkhorn" else (norms[1:] > 0).all()
    for t in teachers:
        mom = log[f"momentum_{t}"]
        knob = "momentum_rec" if t == "rec" or (t == "shared" and "cls" not in kinds and "tok" not in kinds) \
            else "momentum_lab"
        base = getattr(run.cfg.method, knob)
        assert mom[0] == pytest.approx(base) and (np.diff(mom) >= 0).all() and (mom <= 1).all()
    if token_targets:  # LayerNorm-ed targets: std in [0, 1], effective rank in [1, D]
        assert ((log["target_std"] > 0) & (log["target_std"] <= 1)).all()
        assert ((log["target_rank"] >= 1) & (log["target_rank"] <= 64)).all()
    assert ("targets_collapsed" in run.summary) == token_targets
    assert ("collapsed" in run.summary) == (token_targets or bool(kinds))
    if variant == "cosine":
        assert ((log["loss_rec"] >= 0) & (log["loss_rec"] <= 2)).all()
    if kinds or teachers:  # the teachers followed the student: they are no longer its copy
        model = run.model
        for name, teacher in model.teacher_set.items():
            assert not torch.equal(teacher["encoder"].blocks[0].attn.qkv.weight,
                                   model.student.encoder.blocks[0].attn.qkv.weight), name


# --------------------------------------------------------------------------------------------
# 10. Config cross-checks
# --------------------------------------------------------------------------------------------
def test_pixel_target_with_token_labels_is_rejected_naming_the_key():
    with pytest.raises(ConfigError, match="method.lambda_tok"):
        tiny_config(method={"recon_target": "pixel", "lambda_tok": 1.0})
    tiny_config(method={"recon_target": "pixel", "lambda_tok": 0.0})  # fine
    tiny_config(method={"name": "mae", "recon_target": "pixel"})  # mae ignores the knob


def test_all_zero_lambdas_are_rejected_naming_the_keys():
    with pytest.raises(ConfigError) as err:
        tiny_config(method={"lambda_rec": 0, "lambda_cls": 0, "lambda_tok": 0})
    for key in ("lambda_rec", "lambda_cls", "lambda_tok"):
        assert key in str(err.value)


@pytest.mark.parametrize("key,value", [("teachers", "triple"), ("balancing", "none"),
                                       ("teacher_view", "partial"), ("recon_loss", "l1"),
                                       ("lambda_cls", -1.0), ("num_prototypes", 0),
                                       ("momentum_lab", 1.5), ("center_momentum", -0.1)])
def test_bad_method_values_are_rejected_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        tiny_config(method={key: value})


# --------------------------------------------------------------------------------------------
# 11. Teacher views
# --------------------------------------------------------------------------------------------
def teacher_encoder(blocks: nn.Module | None = None) -> nn.Module:
    cfg = pemae_cfg()
    torch.manual_seed(0)
    enc = build_encoder(cfg.model, cfg.data).eval()
    if blocks is not None:
        enc.blocks = blocks
    return enc


@pytest.mark.parametrize("folds", [1, 3, 4, 37, 50])
@pytest.mark.parametrize("blocks", ["identity", "per_token"])
def test_multifold_tokens_come_in_masked_order(folds, blocks):
    torch.manual_seed(0)
    per_token = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    enc = teacher_encoder(nn.Sequential() if blocks == "identity" else per_token)
    imgs = images(3)
    masking = random_masking(3, 49, 0.75)
    with torch.no_grad():
        cls_full, tok_full = teacher_features(enc, imgs, masking, "full", folds)
        cls_mf, tok_mf = teacher_features(enc, imgs, masking, "multifold", folds)
        # the same tokens by hand: LN(f(patch_embed + pos)) at the masked spots
        x = enc.blocks(enc.patch_embed(imgs) + enc.pos_embed[:, 1:])
        by_hand = F.layer_norm(gather_tokens(x, masking.ids_masked), (64,))
    assert tok_mf.shape == tok_full.shape == (3, 37, 64)
    assert torch.allclose(tok_mf, tok_full, atol=1e-5)
    assert torch.allclose(tok_full, by_hand, atol=1e-5)
    assert torch.allclose(cls_mf, cls_full, atol=1e-5)


def test_full_view_targets_are_layer_normed_final_tokens_and_multifold_differs_with_attention():
    enc = teacher_encoder()
    imgs = images(3)
    torch.manual_seed(0)
    masking = random_masking(3, 49, 0.75)
    with torch.no_grad():
        cls, tok = teacher_features(enc, imgs, masking, "full", 4)
        x = encode_patches(enc, imgs)
        _, tok_mf = teacher_features(enc, imgs, masking, "multifold", 4)
    assert torch.allclose(cls, enc.norm(x[:, 0]), atol=1e-6)
    assert torch.allclose(tok, F.layer_norm(gather_tokens(x[:, 1:], masking.ids_masked), (64,)), atol=1e-6)
    assert torch.allclose(tok.mean(-1), torch.zeros(3, 37), atol=1e-5)  # no affine
    assert torch.allclose(tok.var(-1, unbiased=False), torch.ones(3, 37), atol=1e-3)
    assert not torch.allclose(tok, tok_mf, atol=1e-3)  # real blocks see different contexts


def test_model_with_multifold_view_runs_and_uses_the_masked_tokens_only():
    model = build(pemae_cfg(teacher_view="multifold", folds=4)).train()
    out = forward_backward(model, images())
    assert torch.isfinite(out["loss"])
    assert out["mask"].sum(1).eq(37).all()


def test_pemae_state_dict_round_trips_teachers_and_centres():
    model = build(pemae_cfg()).train()
    forward_backward(model, images())
    model.after_step(0)
    clone = build(pemae_cfg(), seed=99)
    clone.load_state_dict(copy.deepcopy(model.state_dict()))
    for (n, a), (_, b) in zip(model.state_dict().items(), clone.state_dict().items()):
        assert torch.equal(a, b), n
    assert any(k.startswith("teacher_set.lab.parts.head.") for k in model.state_dict())
    assert "center_cls" in model.state_dict() and "center_tok" in model.state_dict()


def test_mae_loss_is_unchanged_since_before_the_pemae_method():
    """Regression anchor: the tiny MAE's loss on a fixed input, as computed by the MAE code before
    the PEMAE method was added (commit 8349167, same seeds, torch 2.14.1 on CPU)."""
    cfg = build_config("tiny")
    torch.manual_seed(0)
    model = MaskedAutoencoder(cfg.model, cfg.data)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    loss = model(x)["loss"].item()
    assert loss == pytest.approx(2.2785305976867676, rel=1e-5)


def test_monitors_are_skipped_on_unlogged_steps_without_changing_the_loss():
    model, imgs = build(pemae_cfg()).train(), images()
    noise = torch.rand(len(imgs), 49, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(imgs, 0, noise=noise)
        lean = model(imgs, 0, noise=noise, monitor=False)
    assert {"cls_entropy", "tok_perplexity", "cls_center_norm"} <= set(full)
    assert not any(k.endswith(("entropy", "perplexity", "center_norm")) for k in lean)
    assert torch.equal(full["loss"], lean["loss"])


# --------------------------------------------------------------------------------------------
# 12. Collapse monitors of the token targets
# --------------------------------------------------------------------------------------------
def layer_normed(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


def test_effective_rank_of_known_matrices():
    gen = torch.Generator().manual_seed(0)
    row = torch.randn(1, 16, generator=gen)
    assert effective_rank(row.expand(50, 16)).item() == pytest.approx(1.0, abs=1e-4)  # one direction
    assert effective_rank(torch.zeros(50, 16)).item() == 1.0  # no spread at all
    assert effective_rank(torch.eye(16)).item() == pytest.approx(16.0, rel=1e-5)  # all alike
    q, _ = torch.linalg.qr(torch.randn(40, 16, generator=gen))  # [40, 16], orthonormal columns
    assert effective_rank(q * 3.0).item() == pytest.approx(16.0, rel=1e-5)  # scale-free
    assert effective_rank(q[:, :3]).item() == pytest.approx(3.0, rel=1e-5)
    # singular values 3 and 1: exp(H(3/4, 1/4)), between 1 and 2
    two = q[:, :2] * torch.tensor([3.0, 1.0])  # [40, 2]
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(two).item() == pytest.approx(expected, rel=1e-5)
    bad = torch.eye(4)
    bad[1, 2] = float("nan")
    assert math.isnan(effective_rank(bad).item())  # NaN, not an SVD error: the loss check names it


def test_target_monitors_separate_healthy_from_collapsed_targets():
    gen = torch.Generator().manual_seed(0)
    healthy = target_monitors(layer_normed(torch.randn(8, 37, 64, generator=gen)))
    assert healthy["target_std"].item() == pytest.approx(1.0, abs=0.05)
    assert healthy["target_rank"].item() > 50  # 296 random rows in 64 dimensions
    # one direction: t = LN(a + c·b) only moves along the line through a and b
    a, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    line = target_monitors(layer_normed(a + 0.01 * torch.randn(8, 37, 1, generator=gen) * b))
    assert line["target_rank"].item() < 1.05 and line["target_std"].item() < 0.05
    # one pattern plus faint noise: the centred residue is noise of full rank, only the std sees it
    pattern = layer_normed(a + 1e-3 * torch.randn(8, 37, 64, generator=gen))
    near_constant = target_monitors(pattern)
    assert near_constant["target_std"].item() < 1e-2 and near_constant["target_rank"].item() > 50
    for out in (healthy, line, near_constant):
        assert set(out) == {"target_std", "target_rank"}
        assert all(v.ndim == 0 and not v.requires_grad for v in out.values())


def test_target_rank_subsamples_rows_deterministically():
    gen = torch.Generator().manual_seed(0)
    t = layer_normed(torch.randn(3, 1500, 16, generator=gen))  # 4500 rows > MAX_RANK_ROWS
    first, again = target_monitors(t), target_monitors(t.clone())
    assert torch.equal(first["target_rank"], again["target_rank"])
    rows = torch.arange(MAX_RANK_ROWS) * 4500 // MAX_RANK_ROWS  # evenly spread over all 3 images
    sample = t.reshape(-1, 16)[rows]
    assert torch.allclose(first["target_rank"], effective_rank(sample - sample.mean(0)))
    assert first["target_std"].item() == pytest.approx(t.reshape(-1, 16).std(0, correction=0).mean().item())


@pytest.mark.parametrize("method,token", [
    ({}, True),  # PEMAE dual, token targets
    ({"teachers": "single", "lambda_cls": 0, "lambda_tok": 0}, True),  # token reconstruction only
    ({"recon_target": "pixel", "lambda_tok": 0}, False),
])
def test_target_monitors_only_for_token_targets_and_only_when_monitoring(method, token):
    model, imgs = build(pemae_cfg(**method)).train(), images()
    noise = torch.rand(len(imgs), 49, generator=torch.Generator().manual_seed(0))
    full = model(imgs, 0, noise=noise)
    lean = model(imgs, 0, noise=noise, monitor=False)
    keys = {"target_std", "target_rank"}
    assert (keys <= set(full)) == token and not keys & set(lean)
    assert torch.equal(full["loss"], lean["loss"])
    if token:
        assert all(full[k].ndim == 0 and not full[k].requires_grad for k in keys)


def test_mae_has_no_target_monitors():
    cfg = tiny_config(method={"name": "mae"})
    out = build(cfg)(images())
    assert not {"target_std", "target_rank"} & set(out)


def test_target_monitors_of_a_real_forward_are_those_of_the_teacher_tokens():
    model, imgs = build(pemae_cfg()).train(), images()
    noise = torch.rand(len(imgs), 49, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(imgs, 0, noise=noise)
        masking = random_masking(len(imgs), 49, 0.75, CPU, noise)
        _, tokens = teacher_features(model.rec_teacher["encoder"], imgs, masking, "full", 1)  # [4, 37, 64]
    std, rank = out["target_std"].item(), out["target_rank"].item()
    assert math.isfinite(std) and 0 < std <= 1
    assert math.isfinite(rank) and 1 <= rank <= 64
    by_hand = target_monitors(tokens)
    assert std == pytest.approx(by_hand["target_std"].item(), rel=1e-5)
    assert rank == pytest.approx(by_hand["target_rank"].item(), rel=1e-4)


HEALTHY_LABELS = {"cls_perplexity": 30.0, "cls_entropy": 1.0}


@pytest.mark.parametrize("std,rank,collapsed", [
    (0.8, 20.0, False),  # healthy
    (0.0, 1.0, True),  # every target the same
    (0.5, 1.5, True),  # spread, but along one line
    (0.01, 40.0, True),  # one pattern plus faint full-rank noise
    (COLLAPSED_TARGET_STD, COLLAPSED_TARGET_RANK, False),  # the thresholds themselves pass
])
def test_collapse_report_flags_collapsed_token_targets(std, rank, collapsed):
    report = collapse_report({**HEALTHY_LABELS, "target_std": std, "target_rank": rank}, 64)
    assert report["targets_collapsed"] is collapsed and report["cls_collapsed"] is False
    assert report["collapsed"] is collapsed
    assert report["target_std"] == round(std, 3) and report["target_rank"] == round(rank, 2)
    # token reconstruction only (no pseudo labels): the targets alone decide
    alone = collapse_report({"target_std": std, "target_rank": rank}, 64)
    assert alone == {"target_std": round(std, 3), "target_rank": round(rank, 2),
                     "targets_collapsed": collapsed, "collapsed": collapsed}


def test_collapse_report_rounds_and_is_unchanged_without_token_targets():
    report = collapse_report({"target_std": 0.123456, "target_rank": 12.34567}, 64)
    assert report["target_std"] == 0.123 and report["target_rank"] == 12.35
    # pixel targets / MAE: no target keys, the pseudo-label report as before
    assert collapse_report(HEALTHY_LABELS, 64) == {"cls_perplexity": 30.0, "cls_collapsed": False,
                                                   "collapsed": False}
    assert collapse_report({"loss": 1.0}, 64) == {}


def test_compiled_forward_does_not_recompile_as_the_schedules_move():
    """τ_t and the momenta enter a compiled forward as tensors (PEMAE.step_scalars): once the step
    count is dynamic (after step 0), crossing the end of τ_t's warm-up compiles nothing new.
    (torch.compile's eager backend: the graphs Dynamo captures, without Inductor's compile time.)"""
    import torch._dynamo
    from torch._dynamo.utils import counters

    cfg = build_config("tiny", {"data": {"download": False}, "pretrain": {"device": "cpu"}})
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, 40, 8).train()  # τ_t warms up over the first 12 steps
    model.compile(backend="eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    imgs = torch.randn(8, 1, 28, 28)
    torch._dynamo.reset()
    counters.clear()
    for step in range(4):
        train_step(model, optimizer, imgs, CPU, step, monitor=False)
    graphs = counters["stats"]["unique_graphs"]
    for step in range(4, 20):  # across the end of the warm-up, at step 12
        train_step(model, optimizer, imgs, CPU, step, monitor=False)
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
