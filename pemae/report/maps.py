"""The method figures: CLS attention maps and patch-cluster (pseudo-label) maps, computed and drawn.

Shapes: B images, C channels, H x W pixels, N patches on a gh x gw grid, D width, K prototypes.

- `cls_attention`: the last block's attention from [CLS] to every patch, per head   [B, heads, N]
- `patch_pseudo_labels`: PEMAE's labelling teacher's prototype argmax per patch     [B, N]
- `patch_clusters`: cosine k-means on a ViT's final-normed patch tokens (for MAE)    [B, N]
- `attention_figure`, `label_map_figure`: image grids (one row per image, one column per model)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from pemae.models.encoder import encode_patches  # noqa: E402


LABEL_COLOURS = plt.get_cmap("tab20").colors  # categorical palette; cluster i gets colour i % 20
OVERLAY_ALPHA = 0.55  # weight of the heat map / label colours over the image


# --------------------------------------------------------------------------------------------
# Computing the maps
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put `module` in eval mode for the block and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def cls_attention(vit: nn.Module, imgs: torch.Tensor, block: int = -1) -> torch.Tensor:
    """Attention weights of the [CLS] query over the patch keys in one block (the last by default).

    The weights are recomputed from the block's attention input (`norm1` output, captured with a
    pre-hook on `attn`), `qkv`, `num_heads`, `scale` and `q_norm`/`k_norm`, because timm's
    fused SDPA path never materialises them. Softmax over all 1+N keys, then the [CLS] key is
    dropped, so each row sums to 1 minus the weight [CLS] gives itself.

    [B, C, H, W] (normalised) -> [B, heads, N]. Full image, no masking, eval mode, no grad.
    """
    attn = vit.blocks[block].attn
    captured: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with _eval_mode(vit):
            encode_patches(vit, imgs)  # [B, 1+N, D]; only run to fill `captured`
    finally:
        handle.remove()
    x = captured[0].float()  # [B, 1+N, D], the normed input of the attention
    weights = attention_weights(attn, x)  # [B, heads, 1+N, 1+N]
    return weights[:, :, 0, 1:]  # [B, heads, N]


def attention_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights of a timm `Attention` module on its input: [B, T, D] -> [B, h, T, T]."""
    b, t, _ = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.qkv.weight.float(),
                   None if attn.qkv.bias is None else attn.qkv.bias.float())  # [B, T, 3·h·d]
    qkv = qkv.reshape(b, t, 3, h, -1).permute(2, 0, 3, 1, 4)  # [3, B, h, T, d]
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # [B, h, T, d] each
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # [B, h, T, T]
    return logits.softmax(dim=-1)  # [B, h, T, T]


@torch.no_grad()
def patch_pseudo_labels(model: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """Each patch's pseudo label: argmax over the K prototypes of PEMAE's labelling teacher.

    As in `pemae.models.pemae.teacher_features` (view 'full'): the teacher encoder sees the whole
    image, its last-block patch tokens are LayerNorm-ed without affine, then its head gives
    prototype logits. [B, C, H, W] -> LongTensor [B, N].
    """
    teacher = getattr(model, "lab_teacher", None)
    if teacher is None or "head" not in teacher.parts:
        raise ValueError(
            f"{type(model).__name__} has no labelling teacher (an EMA encoder with a labelling "
            "head), so it gives no pseudo labels: use a PEMAE with lambda_cls > 0 or "
            "lambda_tok > 0, or `patch_clusters` for a plain encoder such as MAE's")
    encoder, head = teacher["encoder"], teacher["head"]
    tokens = encode_patches(encoder, imgs)[:, 1:]  # [B, N, D], before the final norm
    tokens = F.layer_norm(tokens.float(), tokens.shape[-1:])  # [B, N, D], no affine
    return head(tokens).argmax(dim=-1)  # [B, N]


@torch.no_grad()
def patch_clusters(vit: nn.Module, imgs: torch.Tensor, k: int = 8, iters: int = 20,
                   seed: int = 0) -> torch.Tensor:
    """Patch-cluster map for an encoder without prototypes (MAE): cosine k-means on its tokens.

    The final-normed patch tokens of all images of the batch are clustered together, so a
    cluster means the same thing across images. [B, C, H, W] -> LongTensor [B, N] in [0, k).
    """
    with _eval_mode(vit):
        tokens = vit.norm(encode_patches(vit, imgs))[:, 1:]  # [B, N, D]
    b, n, d = tokens.shape
    labels = cosine_kmeans(tokens.reshape(b * n, d), k, iters, seed)  # [B·N]
    return labels.reshape(b, n)  # [B, N]


def cosine_kmeans(features: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Spherical k-means: k-means++ seeding, then `iters` rounds of assign / re-centre.

    Features [S, D] are L2-normalised; similarity is the dot product; a cluster that empties
    keeps its previous centroid. Deterministic for a seed. Returns LongTensor [S] in [0, k).
    """
    if k < 1:
        raise ValueError(f"k = {k}: need at least one cluster")
    x = F.normalize(features.detach().float(), dim=-1)  # [S, D]
    centroids = _kmeans_plus_plus(x, min(k, x.shape[0]), seed)  # [k, D]
    labels = (x @ centroids.T).argmax(dim=1)  # [S]
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)  # [k, D]
        counts = torch.bincount(labels, minlength=centroids.shape[0])  # [k]
        centroids = torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), centroids)  # [k, D]
        new_labels = (x @ centroids.T).argmax(dim=1)  # [S]
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels  # [S]


def _kmeans_plus_plus(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means++ seeding on unit vectors with cosine distance 1 - x·c: [S, D] -> [k, D]."""
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(x.shape[0], (1,), generator=gen))
    chosen = [first]
    dist = (1.0 - x @ x[first]).clamp_min(0.0)  # [S], distance to the nearest chosen centroid
    for _ in range(1, k):
        weights = dist.cpu().double()  # [S]
        if weights.sum() <= 0:  # every point sits on a centroid already: pick uniformly
            weights = torch.ones_like(weights)  # [S]
        nxt = int(torch.multinomial(weights, 1, generator=gen))
        chosen.append(nxt)
        dist = torch.minimum(dist, (1.0 - x @ x[nxt]).clamp_min(0.0))  # [S]
    return x[chosen].clone()  # [k, D]


# --------------------------------------------------------------------------------------------
# Drawing them
# --------------------------------------------------------------------------------------------
def _patch_grid(num_patches: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, cols) patch grid of an H x W image with N patches."""
    rows = round(math.sqrt(num_patches * height / width))
    cols = num_patches // max(rows, 1)
    if rows * cols != num_patches:
        raise ValueError(f"{num_patches} patches do not tile a {height}x{width} image")
    return rows, cols


def _to_rgb(img: torch.Tensor) -> np.ndarray:
    """One image [C, H, W] in [0, 1] (C = 1 or 3) as an RGB array [H, W, 3]."""
    if img.shape[0] not in (1, 3):
        raise ValueError(f"images need 1 or 3 channels, got {img.shape[0]}")
    arr = img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()  # [H, W, C]
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr  # [H, W, 3]


def _upsample(maps: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """Per-patch values [B, N] -> per-pixel [B, H, W] ('bilinear' or 'nearest')."""
    rows, cols = _patch_grid(maps.shape[1], height, width)
    grid = maps.detach().float().reshape(-1, 1, rows, cols)  # [B, 1, gh, gw]
    extra = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(grid, size=(height, width), mode=mode, **extra)[:, 0].cpu()  # [B, H, W]


def _grid_axes(imgs_px: torch.Tensor, columns: dict) -> tuple[plt.Figure, np.ndarray]:
    """A figure with one row per image and the image + one column per model; image column drawn."""
    if imgs_px.dim() != 4:
        raise ValueError(f"imgs_px must be [B, C, H, W], got shape {tuple(imgs_px.shape)}")
    for name, values in columns.items():
        if values.shape[0] != imgs_px.shape[0]:
            raise ValueError(f"{name}: {values.shape[0]} maps for {imgs_px.shape[0]} images")
    rows, cols = imgs_px.shape[0], 1 + len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.0, rows * 1.9), squeeze=False)
    for i in range(rows):
        axes[i, 0].imshow(_to_rgb(imgs_px[i]))
        for ax in axes[i]:
            ax.axis("off")
    axes[0, 0].set_title("image", fontsize=9)
    return fig, axes


def attention_figure(imgs_px: torch.Tensor, attentions: dict[str, torch.Tensor]) -> plt.Figure:
    """Head-averaged [CLS] attention of each model as a heat map over the image.

    imgs_px [B, C, H, W] in [0, 1]; `attentions` maps a column title (e.g. "MAE", "PEMAE") to
    `cls_attention` output [B, heads, N]. Each map is upsampled bilinearly and min-max scaled
    per image.
    """
    fig, axes = _grid_axes(imgs_px, attentions)
    height, width = imgs_px.shape[-2:]
    for j, (name, attn) in enumerate(attentions.items(), start=1):
        heat = _upsample(attn.float().mean(dim=1), height, width, "bilinear")  # [B, H, W]
        lo = heat.flatten(1).min(dim=1).values[:, None, None]  # [B, 1, 1]
        hi = heat.flatten(1).max(dim=1).values[:, None, None]  # [B, 1, 1]
        heat = (heat - lo) / (hi - lo).clamp_min(1e-12)  # [B, H, W] in [0, 1]
        for i in range(imgs_px.shape[0]):
            axes[i, j].imshow(_to_rgb(imgs_px[i]))
            axes[i, j].imshow(heat[i].numpy(), cmap="inferno", alpha=OVERLAY_ALPHA, vmin=0, vmax=1)
        axes[0, j].set_title(f"{name} [CLS] attention", fontsize=9)
    fig.tight_layout()
    return fig


def reindex_by_first_appearance(labels: np.ndarray) -> np.ndarray:
    """Relabel so the first cluster met (row-major) is 0, the next new one 1, ...: [N] -> [N]."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(labels.shape)]


def label_map_figure(imgs_px: torch.Tensor, maps: dict[str, torch.Tensor]) -> plt.Figure:
    """Each model's patch-cluster map in categorical colours, blended over the image.

    imgs_px [B, C, H, W] in [0, 1]; `maps` maps a column title to cluster ids [B, N] (from
    `patch_pseudo_labels` or `patch_clusters`). Ids are re-indexed per image by first
    appearance, so the colours of two models are comparable within a row; each panel's title
    gives its number of distinct clusters.
    """
    fig, axes = _grid_axes(imgs_px, maps)
    height, width = imgs_px.shape[-2:]
    palette = np.asarray(LABEL_COLOURS)  # [20, 3]
    for j, (name, labels) in enumerate(maps.items(), start=1):
        for i in range(imgs_px.shape[0]):
            ids = reindex_by_first_appearance(labels[i].detach().cpu().numpy())  # [N]
            pixels = _upsample(torch.as_tensor(ids)[None], height, width, "nearest")[0]  # [H, W]
            colours = palette[pixels.round().long().numpy() % len(palette)]  # [H, W, 3]
            blended = (1 - OVERLAY_ALPHA) * _to_rgb(imgs_px[i]) + OVERLAY_ALPHA * colours  # [H, W, 3]
            axes[i, j].imshow(blended)
            axes[i, j].set_title(f"{name}:\n{len(np.unique(ids))} clusters", fontsize=7)
    fig.tight_layout()
    return fig
