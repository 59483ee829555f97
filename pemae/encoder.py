"""The ViT encoder: a plain timm `VisionTransformer`, so checkpoints load into timm as they are."""

from __future__ import annotations

import timm
import torch
from torch import nn

from pemae.config import DataConfig, ModelConfig
from pemae.pos_embed import sincos_2d

TIMM_ARCH = "vit_base_patch16_224"  # the architecture name; every size below overrides it


def encoder_kwargs(model: ModelConfig, data: DataConfig) -> dict:
    """Keyword arguments for `timm.create_model(TIMM_ARCH, **kwargs)` that rebuild our encoder."""
    return dict(
        img_size=data.img_size,
        patch_size=model.patch_size,
        in_chans=data.in_chans,
        embed_dim=model.embed_dim,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_ratio=model.mlp_ratio,
    )


def build_encoder(
    model: ModelConfig,
    data: DataConfig,
    num_classes: int = 0,
    global_pool: str = "token",
    drop_path: float = 0.0,
) -> nn.Module:
    """A timm ViT with MAE's fixed 2-D sine-cosine position embedding (frozen for pretraining)."""
    vit = timm.create_model(
        TIMM_ARCH,
        pretrained=False,
        num_classes=num_classes,
        global_pool=global_pool,
        drop_path_rate=drop_path,
        **encoder_kwargs(model, data),
    )
    grid = data.img_size // model.patch_size
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_2d(model.embed_dim, grid, cls_token=True)[None])  # [1, 1+N, D]
    return vit
