"""The exported encoder (`pretrain/encoder.pt`) loads through timm's own pretrained-weights path:

    timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=0),
                      num_classes=0, **encoder_kwargs)

timm reads the file's "state_dict" entry itself, so the file needs no conversion; the overlay's
`num_classes=0` makes timm load it strictly (its default pretrained config declares a 1000-class
head, and a head mismatch makes timm load non-strictly). These are docs/sharing.md's instructions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from pemae.config.params import build_config
from pemae.engine import checkpoint
from pemae.models.encoder import TIMM_ARCH, build_encoder, encoder_kwargs


def timm_from_file(path: Path, kwargs: dict, num_classes: int = 0) -> torch.nn.Module:
    """What docs/sharing.md tells users to write (`kwargs` as stored in the file's "kwargs")."""
    return timm.create_model(TIMM_ARCH, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path), num_classes=0),
                             num_classes=num_classes, **kwargs).eval()


def exported(tmp_path: Path, cfg) -> tuple[torch.nn.Module, Path]:
    """A tiny encoder with non-default weights everywhere, saved as the pretraining stage saves it."""
    torch.manual_seed(0)
    enc = build_encoder(cfg.model, cfg.data).eval()
    with torch.no_grad():  # trunc-normal / constant inits would hide a weight that did not load
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "encoder.pt"
    checkpoint.export_encoder(enc, cfg, path)
    return enc, path


def images(cfg, n=4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    size = cfg.data.img_size
    return torch.randn(n, cfg.data.in_chans, size, size, generator=g)  # [B, C, H, W]


RGB = {"data": {"in_chans": 3, "img_size": 32}, "model": {"patch_size": 8}}


@pytest.mark.parametrize("overrides", [{}, RGB], ids=["fashion_mnist_1ch", "rgb_3ch"])
def test_exported_encoder_loads_with_timm_create_model_pretrained(tmp_path, overrides):
    cfg = build_config("tiny", overrides)
    enc, path = exported(tmp_path, cfg)
    blob = torch.load(path, map_location="cpu", weights_only=True)  # what pemae's readers use
    assert blob["arch"] == TIMM_ARCH and blob["kwargs"] == encoder_kwargs(cfg.model, cfg.data)
    vit = timm_from_file(path, encoder_kwargs(cfg.model, cfg.data))
    x = images(cfg)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x), enc.forward_features(x))  # [B, 1+N, D]
        assert torch.equal(vit(x), enc(x))  # [B, D]: the pooled CLS features
    # the control: the same call without the file gives other weights
    fresh = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0, **blob["kwargs"]).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x), enc(x))


def test_timm_load_is_strict_with_the_overlay(tmp_path):
    cfg = build_config("tiny")
    enc, _ = exported(tmp_path, cfg)
    state = enc.state_dict()
    del state["norm.weight"]
    bad = tmp_path / "bad.pt"
    torch.save({"arch": TIMM_ARCH, "kwargs": encoder_kwargs(cfg.model, cfg.data), "state_dict": state}, bad)
    with pytest.raises(RuntimeError, match="norm.weight"):
        timm_from_file(bad, encoder_kwargs(cfg.model, cfg.data))


def test_timm_loads_the_encoder_under_a_new_head(tmp_path):
    cfg = build_config("tiny")
    enc, path = exported(tmp_path, cfg)
    vit = timm_from_file(path, encoder_kwargs(cfg.model, cfg.data), num_classes=10)
    x = images(cfg)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x), enc.forward_features(x))
        assert vit(x).shape == (len(x), 10)


def test_the_pretraining_stage_export_loads_with_timm(tiny_run):
    path = tiny_run.out_dir / "encoder.pt"  # written by pemae.engine.pretrain.pretrain, as in the pipeline
    kwargs = checkpoint.load(path)["kwargs"]
    vit = timm_from_file(path, kwargs)
    x = images(tiny_run.cfg)
    with torch.no_grad():
        assert torch.equal(vit(x), tiny_run.model.encoder(x))
