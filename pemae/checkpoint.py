"""Checkpoints of tensors and plain dicts, readable with `torch.load(weights_only=True)`."""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from torch import nn

from pemae.config import Config
from pemae.encoder import TIMM_ARCH, encoder_kwargs


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (run the pretraining stage first)")
    return torch.load(path, map_location=map_location, weights_only=True)


def export_encoder(encoder: nn.Module, cfg: Config, path: str | Path) -> None:
    """Save the encoder alone, with what `timm.create_model` needs to rebuild it."""
    save_atomic(
        {
            "arch": TIMM_ARCH,
            "kwargs": encoder_kwargs(cfg.model, cfg.data),
            "state_dict": encoder.state_dict(),
        },
        path,
    )


def load_encoder(path: str | Path, **timm_kwargs) -> nn.Module:
    """Rebuild an exported encoder as a timm ViT (strict load); `timm_kwargs` add e.g. a head."""
    blob = load(path)
    vit = timm.create_model(blob["arch"], pretrained=False, num_classes=0, **blob["kwargs"])
    vit.load_state_dict(blob["state_dict"], strict=True)
    return vit
