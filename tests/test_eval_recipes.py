"""MAE's evaluation recipe on the tiny preset: timm's fine-tuning augmentation and mixup/cutmix,
LARS for the linear probe, and the default path unchanged when the new knobs are off."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.mixup import mixup_target
from torch import nn

from conftest import needs_fashion_mnist, tiny_config
from pemae.config.params import build_config
from pemae.config.schema import ConfigError
from pemae.data import images, transforms
from pemae.engine import checkpoint
from pemae.engine.finetune import build_mixup, classification_loss, finetune
from pemae.engine.optim import set_lr
from pemae.engine.runtime import seed_everything
from pemae.engine.schedules import warmup_cosine
from pemae.eval import probes as evaluate
from pemae.eval.probes import lars, probe_peak_lr, train_linear_probe
from pemae.models.encoder import build_encoder

torch.set_num_threads(1)

MAE_AUGMENT = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}
MAE_MIXING = {"mixup": 0.8, "cutmix": 1.0}


def finetune_cfg(**finetune):
    return build_config("tiny", {"finetune": finetune}).finetune


def batch(n=8, chans=1, size=28, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, chans, size, size, generator=g)  # [n, C, H, W]
    y = torch.arange(n) % classes  # [n]
    return x, y


def lam_from_targets(targets, y, classes, smoothing):
    """The mixing weight of image 0, read back from its soft target (its partner has another class)."""
    off = smoothing / classes
    on = 1 - smoothing + off
    return ((targets[0, y[0]] - off) / (on - off)).item()


# --------------------------------------------------------------------------------------------
# Mixup / cutmix
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs", [MAE_MIXING, {"mixup": 0.8}, {"cutmix": 1.0}])
def test_mixed_batches_keep_their_shape_and_soft_targets_sum_to_one(knobs):
    mixup = build_mixup(finetune_cfg(**knobs), classes=10)
    np.random.seed(0)
    for _ in range(10):
        x, y = batch()
        mixed, targets = mixup(x.clone(), y)
        assert mixed.shape == (8, 1, 28, 28) and targets.shape == (8, 10)
        assert torch.allclose(targets.sum(1), torch.ones(8))
        smoothing = 0.1  # the tiny preset's label smoothing goes into the soft targets
        assert targets.min() >= smoothing / 10 - 1e-6
        assert targets.max() <= 1 - smoothing + smoothing / 10 + 1e-6


def test_mixup_blends_each_image_with_its_mirror_by_the_targets_weight():
    mixup = build_mixup(finetune_cfg(mixup=0.8), classes=10)
    np.random.seed(1)
    x, y = batch()
    mixed, targets = mixup(x.clone(), y)
    lam = lam_from_targets(targets, y, 10, 0.1)
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-5)  # [8, 1, 28, 28]


def test_cutmix_pastes_a_box_whose_area_is_the_targets_weight():
    mixup = build_mixup(finetune_cfg(cutmix=1.0), classes=10)
    np.random.seed(2)
    x, y = batch()
    mixed, targets = mixup(x.clone(), y)
    lam = lam_from_targets(targets, y, 10, 0.1)
    pasted = (mixed != x)[0, 0]  # [28, 28]: where image 0 shows its mirror (randn: never equal)
    assert torch.equal(mixed[0, :, pasted], x.flip(0)[0, :, pasted])
    assert pasted.float().mean().item() == pytest.approx(1 - lam, abs=1e-6)


def test_soft_target_loss_matches_label_smoothed_cross_entropy_when_unmixed():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))  # [6, 10]
    y = torch.tensor([0, 3, 9, 1, 1, 5])
    soft = mixup_target(y, 10, lam=1.0, smoothing=0.1)  # [6, 10]
    assert torch.allclose(classification_loss(logits, soft, 0.1),
                          F.cross_entropy(logits, y, label_smoothing=0.1))
    assert torch.allclose(classification_loss(logits, soft, 0.1),
                          -(soft * logits.log_softmax(1)).sum(1).mean())


def test_mixing_with_an_odd_batch_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="finetune.batch_size = 63"):
        finetune_cfg(batch_size=63, **MAE_MIXING)
    finetune_cfg(batch_size=63)  # no mixing: any batch


def test_bad_finetune_betas_are_a_config_error():
    with pytest.raises(ConfigError, match="finetune.betas"):
        finetune_cfg(betas=[0.9, 1.5])


# --------------------------------------------------------------------------------------------
# timm's augmentation, grayscale and RGB, any size
# --------------------------------------------------------------------------------------------
def pil_image(mode, w=36, h=30, seed=0):
    shape = (h, w) if mode == "L" else (h, w, 3)
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8), mode)


@pytest.mark.parametrize("in_chans,size", [(1, 28), (3, 32), (1, 40), (3, 24)])
def test_timm_transform_gives_the_configured_shape(in_chans, size):
    cfg = build_config("tiny", {"data": {"in_chans": in_chans, "img_size": size},
                                "finetune": {**MAE_AUGMENT, "crop_min_scale": 0.08}})
    transform = transforms.finetune_train_transform(cfg.data, cfg.finetune)
    assert transform is not None and transforms.uses_timm_augmentation(cfg.finetune)
    img = pil_image(images.channel_mode(in_chans))
    for seed in range(30):
        seed_everything(seed)  # timm's transforms draw from the global RNGs
        out = transform(img)  # [C, size, size]
        assert out.shape == (in_chans, size, size) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "original", "originalr", "v0", "v0r",
                                    "augmix-m5-w4-d2", "3a"])
def test_every_timm_policy_works_on_grayscale(policy):
    cfg = build_config("tiny", {"finetune": {"auto_augment": policy}})
    transform = transforms.finetune_train_transform(cfg.data, cfg.finetune)
    for seed in range(20):
        seed_everything(seed)
        assert transform(pil_image("L", seed=seed)).shape == (1, 28, 28)


def test_posterize_to_zero_bits_gives_a_black_image_instead_of_an_error():
    cfg = build_config("tiny", {"finetune": MAE_AUGMENT})
    transform = transforms.finetune_train_transform(cfg.data, cfg.finetune)
    (op,) = [op for op in transforms.augment_ops(transform) if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # RandAugment's strongest posterize
    for mode in ("L", "RGB"):
        out = op(pil_image(mode))
        assert out.mode == mode and np.asarray(out).max() == 0


def test_an_unknown_policy_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="finetune.auto_augment"):
        build_config("tiny", {"finetune": {"auto_augment": "randaugment"}})
    cfg = build_config("tiny", {"finetune": {"auto_augment": "rand-q9"}})  # timm's parser refuses
    with pytest.raises(ConfigError, match="finetune.auto_augment = 'rand-q9'"):
        transforms.finetune_train_transform(cfg.data, cfg.finetune)


# --------------------------------------------------------------------------------------------
# The default path is unchanged
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "default"])
def test_default_knobs_keep_the_light_transform_draw_for_draw(preset):
    cfg = build_config(preset)
    assert not transforms.uses_timm_augmentation(cfg.finetune) and build_mixup(cfg.finetune, 10) is None
    new = transforms.finetune_train_transform(cfg.data, cfg.finetune)
    old = transforms.finetune_transform(cfg.data, cfg.finetune.crop_min_scale)
    img = pil_image("L")
    for seed in range(5):
        torch.manual_seed(seed)
        a = new(img)
        torch.manual_seed(seed)
        assert torch.equal(a, old(img))


def test_default_loss_is_the_label_smoothed_cross_entropy():
    logits, y = torch.randn(5, 10), torch.tensor([1, 2, 3, 4, 5])
    assert torch.equal(classification_loss(logits, y, 0.1), F.cross_entropy(logits, y, label_smoothing=0.1))


def probe_before_lars(train_x, train_y, cfg):
    """The probe loop as it was before `linear_optimizer`: AdamW, no warm-up, lr = linear_lr."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    probe = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False),
                          nn.Linear(train_x.shape[1], int(train_y.max()) + 1))
    nn.init.trunc_normal_(probe[1].weight, std=0.01)
    nn.init.zeros_(probe[1].bias)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.linear_lr, weight_decay=cfg.linear_weight_decay)
    b = min(cfg.linear_batch_size, len(train_x))
    steps = len(train_x) // b
    step = 0
    for _ in range(cfg.linear_epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(steps):
            idx = order[i * b:(i + 1) * b]
            set_lr(opt, warmup_cosine(step, cfg.linear_epochs * steps, cfg.linear_lr, 0.0, 0))
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return probe.eval()


def test_default_probe_is_bit_identical_to_the_adamw_loop():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(300, 16, generator=g), torch.randint(0, 4, (300,), generator=g)
    cfg = build_config("default", {"evaluation": {"linear_epochs": 4, "linear_batch_size": 64}}).evaluation
    assert cfg.linear_optimizer == "adamw" and cfg.linear_base_lr == 0 and cfg.linear_warmup_epochs == 0
    new, old = train_linear_probe(x, y, cfg), probe_before_lars(x, y, cfg)
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))


# --------------------------------------------------------------------------------------------
# LARS
# --------------------------------------------------------------------------------------------
def lars_config(**values):
    """LARS at MAE's peak lr, 6.4 (base 0.1 x 16384 / 256), here at batch 64 (base 25.6): the
    trust ratio makes a step move the weights by about lr x 0.001 of their norm, so MAE's base lr
    at a small batch would barely move them."""
    base = {"linear_optimizer": "lars", "linear_base_lr": 25.6, "linear_batch_size": 64,
            "linear_epochs": 20, "linear_warmup_epochs": 2}
    return build_config("tiny", {"evaluation": {**base, **values}}).evaluation


def clusters(n=320, dim=12, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(n) % classes  # [n]
    return centres[y] + torch.randn(n, dim, generator=g), y  # [n, dim], [n]


def test_lars_steps_move_the_probe_and_lower_the_loss():
    x, y = clusters()
    probe = train_linear_probe(x, y, lars_config())
    start_norm = 0.01 * probe[1].weight.numel() ** 0.5  # trunc_normal(std=0.01) at the start
    with torch.no_grad():
        logits = probe(x)  # [320, 4]
    assert probe[1].weight.norm() > 3 * start_norm
    assert F.cross_entropy(logits, y).item() < 0.7 * math.log(4)  # an unmoved probe: ln 4
    assert (logits.argmax(1) == y).float().mean() > 0.95


def test_lars_step_is_maes_trust_ratio_update():
    """One step from a known state: matrices move by lr x 0.001 |w| / |g| x g (MAE's LARS, no
    decay), biases by lr x g; the first momentum buffer is the (scaled) gradient itself."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    layer.weight.grad, layer.bias.grad = torch.randn(3, 5), torch.randn(3)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = lars(layer, weight_decay=0.0)
    set_lr(opt, 0.5)
    opt.step()
    trust = 0.001 * w.norm() / layer.weight.grad.norm()
    assert torch.allclose(layer.weight, w - 0.5 * trust * layer.weight.grad, atol=1e-7)
    assert torch.allclose(layer.bias, b - 0.5 * layer.bias.grad, atol=1e-7)
    groups = opt.param_groups
    assert [g["always_adapt"] for g in groups] == [True, False] and groups[1]["weight_decay"] == 0.0


def test_probe_lr_follows_the_linear_scaling_rule_on_the_batch_used(monkeypatch):
    assert probe_peak_lr(lars_config(linear_base_lr=0.1), 512) == pytest.approx(0.2)  # 0.1 x 512 / 256
    assert probe_peak_lr(build_config("tiny").evaluation, 512) == 1e-3  # linear_lr as it stands
    lrs = []
    monkeypatch.setattr(evaluate, "set_lr", lambda opt, lr: lrs.append(lr) or set_lr(opt, lr))
    x, y = clusters()  # 320 features: a batch of 1024 is cut to 320, one step per epoch
    train_linear_probe(x, y, lars_config(linear_base_lr=0.1, linear_batch_size=1024,
                                         linear_epochs=4, linear_warmup_epochs=2))
    peak = 0.1 * 320 / 256
    assert lrs == pytest.approx([0.0, peak / 2, peak, peak / 2])  # warm-up 2 steps, then cosine


def test_linear_optimizer_is_validated():
    with pytest.raises(ConfigError, match="evaluation.linear_optimizer"):
        build_config("tiny", {"evaluation": {"linear_optimizer": "sgd"}})


# --------------------------------------------------------------------------------------------
# End to end on the tiny preset
# --------------------------------------------------------------------------------------------
@needs_fashion_mnist
def test_finetune_with_maes_augmentation_and_mixing_runs(tmp_path):
    cfg = tiny_config(method={"name": "mae"},
                      finetune={**MAE_AUGMENT, **MAE_MIXING, "train_subset": 128, "crop_min_scale": 0.08})
    torch.manual_seed(0)
    checkpoint.export_encoder(build_encoder(cfg.model, cfg.data), cfg, tmp_path / "enc.pt")
    summary = finetune(cfg, tmp_path / "enc.pt", tmp_path / "ft", progress=False, test=False)
    assert json.loads((tmp_path / "ft" / "summary.json").read_text()) == summary
    assert 0 <= summary["val_top1"] <= 100
    again = finetune(cfg, tmp_path / "enc.pt", tmp_path / "ft2", progress=False, test=False)
    assert (tmp_path / "ft" / "log.csv").read_text() == (tmp_path / "ft2" / "log.csv").read_text()
    assert again["val_top1"] == summary["val_top1"]  # seeded: the same augmentation and mixing
