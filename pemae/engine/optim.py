"""Optimiser parameter groups: no decay on biases/norms/tokens, and layer-wise lr decay."""

from __future__ import annotations

import torch
from torch import nn


NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token")


def _decays(name: str, param: torch.Tensor) -> bool:
    return param.ndim > 1 and not name.endswith(".bias") and not name.endswith(NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and biases / norms / tokens without weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if _decays(name, param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]


def vit_layer_id(name: str, depth: int) -> int:
    """Depth of a timm ViT parameter: embeddings 0, block i -> i + 1, norms and head depth + 1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_param_groups(vit: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Layer-wise lr decay (BEiT / MAE fine-tuning): lr_scale = layer_decay^(depth + 1 - layer)."""
    depth = len(vit.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in vit.named_parameters():
        if not param.requires_grad:
            continue
        layer, decays = vit_layer_id(name, depth), _decays(name, param)
        group = groups.setdefault((layer, decays), {
            "params": [],
            "weight_decay": weight_decay if decays else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer),
        })
        group["params"].append(param)
    return list(groups.values())


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to `lr` times its own `lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def adamw(groups, device: torch.device, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step on a GPU; torch's default implementation on the CPU
    (the same arithmetic as ever there)."""
    return torch.optim.AdamW(groups, **kwargs, **({"fused": True} if device.type == "cuda" else {}))
