"""The method figures: CLS attention, pseudo-label and k-means patch maps, and their drawings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import matplotlib.pyplot as plt

from pemae.config.params import build_config
from pemae.models.pemae import PEMAE, build_pretrain_model
from pemae.report import maps

PEMAE_METHOD = {"name": "pemae", "num_prototypes": 16, "head_hidden_dim": 32,
                "head_bottleneck_dim": 16}
B, N = 3, 49  # tiny preset: 28x28 grayscale images, 4x4 patches -> a 7x7 grid


def tiny_model(method: dict, **data) -> torch.nn.Module:
    cfg = build_config("tiny", {"method": method, "data": {"download": False, **data}})
    torch.manual_seed(0)
    return build_pretrain_model(cfg, 10, 5)


@pytest.fixture(scope="module")
def pemae_model() -> PEMAE:
    """A tiny PEMAE whose labelling teacher differs from its student (perturbed weights)."""
    model = tiny_model(PEMAE_METHOD)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.lab_teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def imgs() -> torch.Tensor:
    return torch.randn(B, 1, 28, 28, generator=torch.Generator().manual_seed(2))  # [B, 1, H, W]


# -------------------------------------------------------------------------------- attention
def test_cls_attention_shape_and_range(pemae_model, imgs):
    vit = pemae_model.student.encoder
    attn = maps.cls_attention(vit, imgs)  # [B, heads, N]
    assert attn.shape == (B, vit.blocks[-1].attn.num_heads, N)
    assert not attn.requires_grad
    assert (attn >= 0).all()
    total = attn.sum(-1)  # [B, heads]
    assert (total <= 1 + 1e-5).all() and (total > 0).all()


def test_cls_attention_reproduces_block_output(pemae_model, imgs):
    """Weights (plus the dropped CLS key, 1 - row sum) averaging the values, then `proj`,
    give the real (fused) attention module's output on the CLS row."""
    vit = pemae_model.student.encoder
    attn_mod = vit.blocks[-1].attn
    seen: dict[str, torch.Tensor] = {}
    hooks = [attn_mod.register_forward_pre_hook(lambda m, a: seen.update(x=a[0])),
             attn_mod.register_forward_hook(lambda m, a, out: seen.update(out=out))]
    try:
        weights = maps.cls_attention(vit, imgs)  # [B, h, N]
    finally:
        for h in hooks:
            h.remove()
    x = seen["x"]  # [B, 1+N, D]
    heads = attn_mod.num_heads
    v = attn_mod.qkv(x).reshape(B, 1 + N, 3, heads, -1)[:, :, 2].transpose(1, 2)  # [B, h, 1+N, d]
    full = torch.cat([1 - weights.sum(-1, keepdim=True), weights], dim=-1)  # [B, h, 1+N]
    mixed = (full.unsqueeze(-1) * v).sum(-2)  # [B, h, d]
    cls_out = attn_mod.proj(attn_mod.norm(mixed.reshape(B, -1)))  # [B, D]
    torch.testing.assert_close(cls_out, seen["out"][:, 0], atol=1e-5, rtol=1e-4)


def test_cls_attention_matches_timm_explicit_path(pemae_model, imgs):
    """With fused SDPA off, timm materialises the weights (input of attn_drop): same values."""
    vit = pemae_model.student.encoder
    attn_mod = vit.blocks[-1].attn
    seen: dict[str, torch.Tensor] = {}
    fused = attn_mod.fused_attn
    attn_mod.fused_attn = False
    hook = attn_mod.attn_drop.register_forward_hook(lambda m, a, out: seen.update(w=out))
    try:
        weights = maps.cls_attention(vit, imgs)  # [B, h, N]
    finally:
        hook.remove()
        attn_mod.fused_attn = fused
    torch.testing.assert_close(weights, seen["w"][:, :, 0, 1:], atol=1e-6, rtol=1e-5)


def test_cls_attention_restores_train_mode(imgs):
    model = tiny_model({"name": "mae"})
    model.train()
    maps.cls_attention(model.encoder, imgs)
    assert model.encoder.training
    assert not model.encoder.blocks[-1].attn._forward_pre_hooks


# -------------------------------------------------------------------------------- pseudo labels
def test_patch_pseudo_labels_match_hand_computation(pemae_model, imgs):
    labels = maps.patch_pseudo_labels(pemae_model, imgs)  # [B, N]
    assert labels.shape == (B, N) and labels.dtype == torch.long
    assert ((labels >= 0) & (labels < 16)).all()

    enc, head = pemae_model.lab_teacher["encoder"], pemae_model.lab_teacher["head"]
    with torch.no_grad():  # timm's own embedding path, then the blocks, no final norm
        x = enc.blocks(enc.norm_pre(enc._pos_embed(enc.patch_embed(imgs))))  # [B, 1+N, D]
        tokens = F.layer_norm(x[:, 1:], (x.shape[-1],))  # [B, N, D]
        expected = head(tokens).argmax(-1)  # [B, N]
    assert torch.equal(labels, expected)


@pytest.mark.parametrize("method", [{"name": "mae"},
                                    {**PEMAE_METHOD, "lambda_cls": 0.0, "lambda_tok": 0.0}])
def test_patch_pseudo_labels_needs_labelling_teacher(method, imgs):
    with pytest.raises(ValueError, match="no labelling teacher"):
        maps.patch_pseudo_labels(tiny_model(method), imgs)


# -------------------------------------------------------------------------------- k-means
def test_patch_clusters_deterministic_and_in_range(pemae_model, imgs):
    vit = pemae_model.student.encoder
    a = maps.patch_clusters(vit, imgs, k=5, iters=10, seed=3)  # [B, N]
    b = maps.patch_clusters(vit, imgs, k=5, iters=10, seed=3)  # [B, N]
    assert a.shape == (B, N) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert ((a >= 0) & (a < 5)).all()


def test_cosine_kmeans_recovers_separated_clusters():
    k, per, dim = 6, 40, 16
    gen = torch.Generator().manual_seed(0)
    centres = torch.linalg.qr(torch.randn(dim, k, generator=gen))[0].T  # [k, D], orthonormal
    truth = torch.arange(k).repeat_interleave(per)  # [S]
    feats = 3.0 * centres[truth] + 0.1 * torch.randn(k * per, dim, generator=gen)  # [S, D]
    perm = torch.randperm(k * per, generator=gen)
    feats, truth = feats[perm], truth[perm]
    for seed in range(3):
        found = maps.cosine_kmeans(feats, k, iters=20, seed=seed)  # [S]
        pairs = set(zip(truth.tolist(), found.tolist()))
        assert len(pairs) == k and len({f for _, f in pairs}) == k  # a bijection


def test_cosine_kmeans_more_clusters_than_points():
    found = maps.cosine_kmeans(torch.randn(3, 4), k=8)
    assert found.shape == (3,) and (found < 8).all()


# -------------------------------------------------------------------------------- figures
def test_reindex_by_first_appearance():
    import numpy as np

    out = maps.reindex_by_first_appearance(np.array([7, 7, 2, 9, 2, 7]))
    assert out.tolist() == [0, 0, 1, 2, 1, 0]


@pytest.mark.parametrize("chans", [1, 3])
def test_figures_draw_and_save(chans, tmp_path):
    model = tiny_model(PEMAE_METHOD, in_chans=chans).eval()
    imgs = torch.randn(2, chans, 28, 28, generator=torch.Generator().manual_seed(4))  # [2, C, H, W]
    px = (imgs * 0.25 + 0.5).clamp(0, 1)  # [2, C, H, W] in [0, 1]
    vit = model.student.encoder
    attn = {"MAE": maps.cls_attention(vit, imgs),
            "PEMAE": maps.cls_attention(model.lab_teacher["encoder"], imgs)}
    labels = {"MAE": maps.patch_clusters(vit, imgs, k=4),
              "PEMAE": maps.patch_pseudo_labels(model, imgs)}
    for name, fig in [("attention", maps.attention_figure(px, attn)),
                      ("labels", maps.label_map_figure(px, labels))]:
        assert isinstance(fig, plt.Figure)
        assert len(fig.axes) == 2 * 3
        path = tmp_path / f"{name}_{chans}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        assert path.stat().st_size > 5_000


def test_label_map_titles_count_clusters():
    px = torch.rand(1, 3, 28, 28)  # [1, 3, H, W]
    labels = torch.tensor([[5] * 20 + [3] * 29])  # [1, N]
    fig = maps.label_map_figure(px, {"A": labels})
    assert fig.axes[1].get_title() == "A:\n2 clusters"
    plt.close(fig)


def test_figure_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="maps for"):
        maps.attention_figure(torch.rand(2, 1, 28, 28), {"A": torch.rand(3, 2, N)})
