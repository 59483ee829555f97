"""Unit tests of the masked autoencoder: masking, patches, loss, encoder, position embedding,
schedules and optimiser parameter groups. Tiny models and tensors only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pemae.config.params import build_config
from pemae.engine.optim import layer_decay_param_groups, param_groups, set_lr, vit_layer_id
from pemae.engine.schedules import warmup_cosine
from pemae.models.encoder import build_encoder
from pemae.models.encoder import gather_tokens
from pemae.models.mae import Masking, MaskedAutoencoder, random_masking
from pemae.models.pos_embed import sincos_1d, sincos_2d


def tiny_model(**model) -> MaskedAutoencoder:
    cfg = build_config("tiny", {"model": model} if model else None)
    torch.manual_seed(0)
    return MaskedAutoencoder(cfg.model, cfg.data).eval()


def fixed_masking(b: int, n: int, ratio: float, seed: int = 0) -> Masking:
    torch.manual_seed(seed)
    return random_masking(b, n, ratio)


@pytest.fixture(scope="module")
def model() -> MaskedAutoencoder:
    return tiny_model()


# --------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,ratio", [(49, 0.75), (196, 0.75), (16, 0.5), (10, 0.3), (7, 0.9)])
def test_random_masking_keeps_int_n_times_1_minus_r_visible(n, ratio):
    b = 5
    m = fixed_masking(b, n, ratio)
    v = int(n * (1 - ratio))
    assert m.ids_keep.shape == (b, v)
    assert m.ids_masked.shape == (b, n - v)
    assert m.ids_restore.shape == (b, n)
    assert m.mask.shape == (b, n)
    assert torch.equal(m.mask.sum(1), torch.full((b,), float(n - v)))
    assert set(m.mask.unique().tolist()) <= {0.0, 1.0}


def test_random_masking_keep_and_masked_partition_the_patches():
    b, n = 6, 49
    m = fixed_masking(b, n, 0.75)
    for i in range(b):
        both = torch.cat([m.ids_keep[i], m.ids_masked[i]])
        assert torch.equal(both.sort().values, torch.arange(n))


def test_random_masking_mask_is_zero_at_kept_and_one_at_masked_ids():
    b, n = 4, 49
    m = fixed_masking(b, n, 0.75)
    for i in range(b):
        assert torch.all(m.mask[i, m.ids_keep[i]] == 0)
        assert torch.all(m.mask[i, m.ids_masked[i]] == 1)


def test_random_masking_ids_restore_inverts_the_shuffle():
    b, n = 3, 49
    m = fixed_masking(b, n, 0.75)
    shuffle = torch.cat([m.ids_keep, m.ids_masked], dim=1)  # [B, N]
    # un-shuffling the shuffled order gives patch order back
    assert torch.equal(torch.gather(shuffle, 1, m.ids_restore), torch.arange(n).expand(b, n))
    # and a token sequence in shuffled order is restored to patch order
    x = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(b, n, 2)  # [B, N, 2]
    shuffled = gather_tokens(x, shuffle)
    assert torch.equal(gather_tokens(shuffled, m.ids_restore), x)


def test_random_masking_differs_between_samples_and_calls():
    m = fixed_masking(8, 49, 0.75)
    rows = {tuple(r.tolist()) for r in m.mask}
    assert len(rows) == 8
    assert not torch.equal(m.mask, random_masking(8, 49, 0.75).mask)


def test_gather_tokens_picks_rows_per_sample():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    ids = torch.tensor([[3, 0], [1, 2]])
    out = gather_tokens(x, ids)
    assert torch.equal(out[0], x[0, [3, 0]])
    assert torch.equal(out[1], x[1, [1, 2]])


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_chans", [1, 3])
def test_patchify_unpatchify_round_trip(in_chans):
    cfg = build_config("tiny", {"data": {"in_chans": in_chans}})
    model = MaskedAutoencoder(cfg.model, cfg.data)
    imgs = torch.randn(2, in_chans, 28, 28)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 49, 4 * 4 * in_chans)
    assert torch.equal(model.unpatchify(patches), imgs)
    x = torch.randn(2, 49, 16 * in_chans)
    assert torch.equal(model.patchify(model.unpatchify(x)), x)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_patch_k_is_the_kth_row_major_crop(in_chans):
    cfg = build_config("tiny", {"data": {"in_chans": in_chans}})
    model = MaskedAutoencoder(cfg.model, cfg.data)
    p, g = 4, 7
    imgs = torch.randn(2, in_chans, 28, 28)
    patches = model.patchify(imgs)  # [B, 49, p*p*C]
    for k in (0, 1, 6, 7, 23, 48):
        r, c = divmod(k, g)  # row-major
        crop = imgs[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p]  # [B, C, p, p]
        assert torch.equal(patches[:, k], crop.permute(0, 2, 3, 1).reshape(2, -1))


def test_patchify_pixel_by_hand():
    cfg = build_config("tiny", {"data": {"in_chans": 3}})
    model = MaskedAutoencoder(cfg.model, cfg.data)
    imgs = torch.zeros(1, 3, 28, 28)
    # patch (row 1, col 2) = index 1*7+2 = 9; pixel (row 3, col 1) inside it; channel 2
    imgs[0, 2, 1 * 4 + 3, 2 * 4 + 1] = 5.0
    patches = model.patchify(imgs)
    # pixels are ordered (row, col, channel): (3 * p + 1) * C + 2 = (3*4+1)*3+2 = 41
    assert patches[0, 9, 41] == 5.0
    assert patches.abs().sum() == 5.0


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------
def _loss_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(2, 1, 28, 28, generator=g)
    pred = torch.randn(2, 49, 16, generator=g)
    m = fixed_masking(2, 49, 0.75, seed)
    return imgs, pred, m


def test_loss_ignores_predictions_at_visible_patches(model):
    imgs, pred, m = _loss_inputs(model)
    base = model.forward_loss(imgs, pred, m.mask)
    changed = pred.clone()
    for b in range(2):
        changed[b, m.ids_keep[b]] += 100.0
    assert torch.equal(model.forward_loss(imgs, changed, m.mask), base)
    changed[0, m.ids_masked[0, 0], 3] += 1.0
    assert model.forward_loss(imgs, changed, m.mask) != base


def test_loss_ignores_image_content_at_visible_patches(model):
    imgs, pred, m = _loss_inputs(model)
    base = model.forward_loss(imgs, pred, m.mask)
    patches = model.patchify(imgs)
    for b in range(2):
        patches[b, m.ids_keep[b]] = torch.randn(len(m.ids_keep[b]), 16) * 7
    assert torch.equal(model.forward_loss(model.unpatchify(patches), pred, m.mask), base)
    patches[1, m.ids_masked[1, 0]] = torch.randn(16) * 7
    assert model.forward_loss(model.unpatchify(patches), pred, m.mask) != base


def test_loss_is_the_mean_squared_error_over_masked_patches(model):
    imgs, pred, m = _loss_inputs(model)
    target = model.pixel_targets(imgs)
    per_patch = ((pred - target) ** 2).mean(-1)  # [B, N]
    expected = per_patch[m.mask.bool()].mean()
    assert torch.allclose(model.forward_loss(imgs, pred, m.mask), expected, atol=1e-6)


def test_norm_pix_targets_have_zero_mean_unit_variance_per_patch(model):
    assert model.norm_pix_loss
    imgs = torch.randn(2, 1, 28, 28) * 3 + 5
    target = model.pixel_targets(imgs)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 49), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 49), atol=1e-4)


def test_without_norm_pix_targets_are_the_raw_patches():
    model = tiny_model(norm_pix_loss=False)
    imgs = torch.randn(2, 1, 28, 28) * 3 + 5
    assert torch.equal(model.pixel_targets(imgs), model.patchify(imgs))


# --------------------------------------------------------------------------------------------
# Encoder, decoder, forward
# --------------------------------------------------------------------------------------------
def test_sparse_encoder_sees_only_cls_and_visible_tokens(model):
    m = fixed_masking(3, 49, 0.75)
    latent = model.forward_encoder(torch.randn(3, 1, 28, 28), m)
    assert latent.shape == (3, 1 + 12, 64)


def test_sparse_encoder_output_depends_only_on_visible_patches(model):
    imgs = torch.randn(2, 1, 28, 28)
    m = fixed_masking(2, 49, 0.75)
    patches = model.patchify(imgs)
    for b in range(2):
        patches[b, m.ids_masked[b]] = torch.randn(len(m.ids_masked[b]), 16)
    with torch.no_grad():
        a = model.forward_encoder(imgs, m)
        b_ = model.forward_encoder(model.unpatchify(patches), m)
    assert torch.allclose(a, b_, atol=1e-6)


def test_encoder_with_every_patch_kept_equals_timm_forward_features(model):
    imgs = torch.randn(2, 1, 28, 28)
    all_kept = Masking(torch.arange(49).expand(2, 49), torch.zeros(2, 0, dtype=torch.long),
                       torch.arange(49).expand(2, 49), torch.zeros(2, 49))
    with torch.no_grad():
        ours = model.forward_encoder(imgs, all_kept)
        timm_features = model.encoder.forward_features(imgs)
    assert ours.shape == timm_features.shape == (2, 50, 64)
    assert torch.allclose(ours, timm_features, atol=1e-5)


def test_decoder_returns_every_patch_in_patch_order(model):
    m = fixed_masking(2, 49, 0.75)
    latent = torch.randn(2, 13, 64)
    out = model.forward_decoder(latent, m)
    assert out.shape == (2, 49, 32)


def test_forward_returns_documented_shapes(model):
    out = model(torch.randn(3, 1, 28, 28))
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert torch.equal(out["loss_rec"], out["loss"].detach())
    assert out["pred"].shape == (3, 49, 16)
    assert out["mask"].shape == (3, 49)
    assert torch.equal(out["mask"].sum(1), torch.full((3,), 49.0 - 12))


def test_gradients_reach_encoder_and_decoder_but_not_fixed_pos_embed():
    model = tiny_model().train()
    model(torch.randn(2, 1, 28, 28))["loss"].backward()
    enc, dec = model.encoder, model
    for name, param in [("patch_embed", enc.patch_embed.proj.weight), ("cls_token", enc.cls_token),
                        ("block0.qkv", enc.blocks[0].attn.qkv.weight), ("norm", enc.norm.weight),
                        ("decoder_embed", dec.decoder_embed.weight), ("mask_token", dec.mask_token),
                        ("decoder_block", dec.decoder_blocks[0].mlp.fc1.weight),
                        ("decoder_pred", dec.decoder_pred.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert not enc.pos_embed.requires_grad
    assert enc.pos_embed.grad is None
    assert "decoder_pos_embed" not in dict(model.named_parameters())
    assert "decoder_pos_embed" in dict(model.named_buffers())


def test_encoder_pos_embed_is_the_fixed_sincos_table(model):
    expected = sincos_2d(64, 7, cls_token=True)[None]
    assert torch.equal(model.encoder.pos_embed.detach(), expected)
    assert torch.equal(model.decoder_pos_embed, sincos_2d(32, 7, cls_token=True)[None])


def test_mae_init_zeroes_linear_biases_and_sets_layernorms_to_identity(model):
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            assert torch.all(m.bias == 0)
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


# --------------------------------------------------------------------------------------------
# Position embedding
# --------------------------------------------------------------------------------------------
def test_sincos_2d_shape_cls_row_and_distinct_rows():
    emb = sincos_2d(16, 5, cls_token=True)
    assert emb.shape == (26, 16)
    assert torch.equal(emb[0], torch.zeros(16))
    assert sincos_2d(16, 5).shape == (25, 16)
    assert torch.equal(sincos_2d(16, 5), emb[1:])
    dist = torch.cdist(emb[1:], emb[1:])
    assert dist[~torch.eye(25, dtype=torch.bool)].min() > 1e-3


def test_sincos_2d_first_half_encodes_column_second_half_row():
    emb = sincos_2d(8, 3)  # [9, 8], patch k = (row k // 3, col k % 3)
    assert torch.allclose(emb[0, :4], emb[3, :4])  # same column, different row
    assert not torch.allclose(emb[0, 4:], emb[3, 4:])
    assert torch.allclose(emb[0, 4:], emb[1, 4:])  # same row, different column
    assert torch.allclose(emb[4, :4], sincos_1d(4, torch.tensor([1]))[0])


def test_sincos_rejects_bad_widths():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(6, 3)
    with pytest.raises(ValueError, match="even"):
        sincos_1d(3, torch.arange(2))


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
def test_warmup_cosine_shape():
    total, warm, peak, final = 100, 10, 1.0, 0.1
    lrs = [warmup_cosine(s, total, peak, final, warm) for s in range(total + 1)]
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5)
    assert lrs[warm] == pytest.approx(peak)
    assert max(lrs) == pytest.approx(peak)
    assert lrs[total] == pytest.approx(final)
    assert lrs[55] == pytest.approx(final + 0.5 * (peak - final))  # half-way through the decay
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm + 1]))  # increasing in warm-up
    assert all(a > b for a, b in zip(lrs[warm:total], lrs[warm + 1:]))  # decreasing after
    assert warmup_cosine(total + 50, total, peak, final, warm) == pytest.approx(final)


def test_warmup_cosine_without_warmup_starts_at_peak():
    assert warmup_cosine(0, 10, 2.0, 0.0, 0) == 2.0
    assert warmup_cosine(10, 10, 2.0, 0.0, 0) == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------
# Optimiser parameter groups
# --------------------------------------------------------------------------------------------
def test_param_groups_decay_only_weight_matrices(model):
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    for name in ("encoder.cls_token", "mask_token", "encoder.norm.weight", "encoder.norm.bias",
                 "encoder.blocks.0.norm1.weight", "encoder.blocks.0.attn.qkv.bias",
                 "decoder_norm.weight", "decoder_pred.bias", "encoder.patch_embed.proj.bias"):
        assert name in no_decay_names, name
    for name in ("encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight",
                 "decoder_embed.weight", "decoder_pred.weight", "decoder_blocks.0.mlp.fc2.weight"):
        assert name in decay_names, name
    assert "encoder.pos_embed" not in decay_names | no_decay_names  # frozen: in no group


def test_param_groups_cover_every_trainable_parameter_exactly_once(model):
    groups = param_groups(model, 0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def test_param_groups_put_a_trainable_pos_embed_in_no_decay():
    cfg = build_config("tiny")
    vit = build_encoder(cfg.model, cfg.data)
    assert vit.pos_embed.requires_grad
    decay, no_decay = param_groups(vit, 0.1)
    assert any(p is vit.pos_embed for p in no_decay["params"])
    assert not any(p is vit.pos_embed for p in decay["params"])


def test_layer_decay_scales_head_1_and_patch_embedding_decay_to_depth_plus_1():
    cfg = build_config("tiny")
    vit = build_encoder(cfg.model, cfg.data, num_classes=10, global_pool="avg")
    depth, ld = cfg.model.depth, 0.5
    groups = layer_decay_param_groups(vit, 0.05, ld)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(vit.named_parameters())
    assert scale[id(params["head.weight"])] == 1.0
    assert scale[id(params["head.bias"])] == 1.0
    assert scale[id(params["fc_norm.weight"])] == 1.0
    assert scale[id(params["patch_embed.proj.weight"])] == pytest.approx(ld ** (depth + 1))
    assert scale[id(params["cls_token"])] == pytest.approx(ld ** (depth + 1))
    assert scale[id(params["pos_embed"])] == pytest.approx(ld ** (depth + 1))
    for i in range(depth):
        assert scale[id(params[f"blocks.{i}.attn.qkv.weight"])] == pytest.approx(ld ** (depth - i))
    assert wd[id(params["head.weight"])] == 0.05 and wd[id(params["head.bias"])] == 0.0
    assert wd[id(params["cls_token"])] == 0.0
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(vit.parameters()))


def test_vit_layer_id():
    assert vit_layer_id("patch_embed.proj.weight", 4) == 0
    assert vit_layer_id("cls_token", 4) == 0
    assert vit_layer_id("blocks.0.norm1.weight", 4) == 1
    assert vit_layer_id("blocks.3.mlp.fc1.bias", 4) == 4
    assert vit_layer_id("blocks.11.mlp.fc1.bias", 12) == 12
    assert vit_layer_id("head.weight", 4) == 5


def test_set_lr_honours_lr_scale():
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 0.25}, {"params": [b], "lr_scale": 1.0},
                             {"params": [c]}], lr=0.0)
    set_lr(opt, 0.4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.4, 0.4])
