"""Fixed 2-D sine-cosine position embeddings (MAE, He et al. 2022; after Vaswani et al. 2017)."""

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sine-cosine embedding of 1-D positions: [P] -> [P, dim]."""
    if dim % 2:
        raise ValueError(f"sine-cosine embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)  # [dim/2]
    omega = 1.0 / 10000**omega  # [dim/2]
    angles = positions.double()[:, None] * omega[None, :]  # [P, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()  # [P, dim]


def sincos_2d(dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """Embedding of a grid_size x grid_size patch grid, row-major: [(1 +) G*G, dim].

    Half the width encodes the row, half the column; the class token (if any) gets zeros.
    """
    if dim % 4:
        raise ValueError(f"2-D sine-cosine embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [G, G] each
    emb = torch.cat(
        [sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1
    )  # [G*G, dim]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)  # [1 + G*G, dim]
    return emb
