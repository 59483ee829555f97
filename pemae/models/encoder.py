"""The ViT encoder: a plain timm `VisionTransformer`, so checkpoints load into timm as they are."""

from __future__ import annotations

import timm
import torch
from torch import nn

from pemae.config.schema import DataConfig, ModelConfig
from pemae.models.pos_embed import sincos_2d


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


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x[b, ids[b]] for every sample: [B, N, D], [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def encode_patches(vit: nn.Module, imgs: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """[CLS] + the patches at `ids` (all when None) through the blocks, before the final norm.

    [B, C, H, W], [B, K] -> [B, 1+K, D]. Sparse: only the chosen patches are processed (MAE).
    """
    x = vit.patch_embed(imgs)  # [B, N, D]
    x = x + vit.pos_embed[:, 1:]  # [B, N, D]
    if ids is not None:
        x = gather_tokens(x, ids)  # [B, K, D]
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # [B, 1, D]
    x = torch.cat([cls, x], dim=1)  # [B, 1+K, D]
    return vit.blocks(vit.norm_pre(x))  # [B, 1+K, D]


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
