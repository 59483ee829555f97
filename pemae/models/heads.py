"""Heads on top of the encoder and decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class LabellingHead(nn.Module):
    """DINO / iBOT projection head: MLP -> L2-normalise -> weight-normalised prototypes.

    Maps features [..., D] to prototype logits [..., K]. Shared by the student and (as an EMA
    copy) the labelling teacher. The prototype norms are fixed to 1 (DINO's `norm_last_layer`).
    """

    def __init__(self, in_dim: int, num_prototypes: int, hidden_dim: int, bottleneck_dim: int,
                 num_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, num_prototypes, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)  # the norms g
        self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # [..., bottleneck]
        # the prototype layer in fp32 even under autocast: its cosine logits are divided by a
        # temperature of 0.04-0.1, and bf16 would round them at 2^-9 first (DINO keeps it in fp32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.normalize(x.float(), dim=-1)  # [..., bottleneck]
            return self.last_layer(x)  # [..., K] fp32
