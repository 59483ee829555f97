"""Tests of the dense (segmentation) linear probe (`pemae.eval.dense`): scenes, the resized encoder,
the probe and its scores, on the tiny preset or synthetic tensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import matplotlib.pyplot as plt

from conftest import needs_fashion_mnist, tiny_config
from pemae.config.params import build_config
from pemae.config.schema import ConfigError, DenseConfig
from pemae.data.datasets import build_dataset, source_indices, train_val_indices
from pemae.engine import checkpoint
from pemae.eval.dense import (LOGIT_BUDGET_BYTES, band_logits, confusion_matrix, dense_probe,
                              dense_scores, logit_chunks, mean_iou, pixel_accuracy, pixel_logits,
                              pixel_loss, predict_maps, resize_encoder, train_dense_probe)
from pemae.eval.scenes import (Scenes, build_scenes, canvas_size, compose_scenes, draw_placements,
                               paste)
from pemae.models.encoder import build_encoder
from pemae.models.pos_embed import sincos_2d
from pemae.report.dense_maps import draw_dense_predictions, label_colours


# --------------------------------------------------------------------------------------------
# Scene composition on synthetic items
# --------------------------------------------------------------------------------------------
def synthetic_items(n: int = 10, channels: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Items [n, C, size, size] in [0, 1] with a dark border (background) around each."""
    items = torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
    items[..., :1, :] = items[..., -1:, :] = items[..., :, :1] = items[..., :, -1:] = 0.0
    return items


def draw(seed: int, num_scenes: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    placements, positions = draw_placements(10, num_scenes, 16, 8, 2, 4, gen)
    pixels, labels = compose_scenes(synthetic_items(), torch.arange(10) % 3, placements, positions, 16, 0.1)
    return placements, positions, pixels, labels


def test_scene_generation_is_deterministic_for_a_seed_and_differs_across_seeds():
    first, again, other = draw(0), draw(0), draw(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[3], other[3])


def test_placements_respect_the_counts_and_the_canvas():
    placements, positions, pixels, labels = draw(0, num_scenes=200)
    counts = (placements >= 0).sum(1)  # [S]
    assert counts.min() == 2 and counts.max() == 4  # both ends drawn in 200 scenes
    present = placements >= 0  # items are listed first, padding after
    assert torch.equal(present, torch.arange(4)[None] < counts[:, None])
    assert positions.min() >= 0 and positions.max() <= 16 - 8
    assert pixels.shape == (200, 1, 16, 16) and labels.shape == (200, 16, 16)
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3}


def test_labels_of_a_known_placement_pixel_by_pixel_top_item_wins():
    # item A: a 4 x 4 square with a bright plus sign; item B: a bright 2 x 2 block in a 4 x 4 box
    a = torch.zeros(1, 4, 4)
    a[0, 1, :] = 0.8
    a[0, :, 1] = 0.8
    b = torch.zeros(1, 4, 4)
    b[0, 2:, 2:] = 0.5
    b[0, 0, 0] = 0.05  # below the threshold: not part of B's silhouette
    items, classes = torch.stack([a, b]), torch.tensor([3, 7])
    placements = torch.tensor([[0, 1, -1]])  # A below, B on top, no third item
    positions = torch.tensor([[[1, 1], [2, 0], [0, 0]]])  # A at (1, 1), B at (2, 0)
    pixels, labels = compose_scenes(items, classes, placements, positions, canvas=6, threshold=0.1)

    expected = torch.zeros(6, 6, dtype=torch.int64)
    expected[2, 1:5] = 4  # A's plus: row 1 of A -> canvas row 2, columns 1..4
    expected[1:5, 2] = 4  # column 1 of A -> canvas column 2, rows 1..4
    expected[4:6, 2:4] = 8  # B's block: rows 2..3 of B -> canvas rows 4..5, columns 2..3
    assert torch.equal(labels[0], expected)
    assert pixels[0, 0, 4, 2] == 0.5  # B on top of A's pixel
    assert pixels[0, 0, 3, 2] == 0.8  # A shows through outside B's silhouette (B's box covers it)
    assert pixels[0, 0, 2, 0] == 0.0  # B's faint pixel is not pasted
    assert pixels[0, 0][expected == 0].abs().max() == 0.0  # background stays black


def test_paste_handles_any_channel_count():
    pixels, labels = torch.zeros(3, 5, 5), torch.zeros(5, 5, dtype=torch.int64)
    item = torch.zeros(3, 2, 2)
    item[:, 0, 0] = torch.tensor([0.9, 0.3, 0.6])  # mean 0.6: in the silhouette
    item[:, 1, 1] = torch.tensor([0.15, 0.0, 0.0])  # mean 0.05: not
    paste(pixels, labels, item, 5, top=3, left=1, threshold=0.1)
    assert torch.equal(pixels[:, 3, 1], item[:, 0, 0]) and labels[3, 1] == 5
    assert labels.sum() == 5 and pixels[:, 4, 2].abs().sum() == 0


def test_source_indices_follow_nested_subsets():
    base = list(range(100))
    outer = torch.utils.data.Subset(torch.utils.data.Subset(base, list(range(50, 100))), [3, 1, 4])
    mapped = source_indices(outer, torch.tensor([[0, 2, -1]]))
    assert mapped.tolist() == [[53, 54, -1]]


# --------------------------------------------------------------------------------------------
# Scenes from the pipeline's splits (tiny preset)
# --------------------------------------------------------------------------------------------
def top_item_matches_its_source(scenes: Scenes, source_images: torch.Tensor, img_size: int) -> None:
    """The pixels of each scene's top item are those of its source image (by source index)."""
    for s in range(len(scenes)):
        last = int((scenes.items[s] >= 0).sum()) - 1
        src = int(scenes.source_items[s, last])
        top, left = scenes.positions[s, last].tolist()
        image = source_images[src].float() / 255.0  # [h, w]
        mask = image > 0.1  # what the threshold keeps (img_size 28: no resampling)
        window = scenes.pixels[s, 0, top:top + img_size, left:left + img_size]  # [h, w]
        assert torch.allclose(window[mask], image[mask], atol=1e-5)


@needs_fashion_mnist
def test_scenes_of_the_tiny_preset_are_deterministic_and_seeded():
    cfg = tiny_config()
    first, again = build_scenes(cfg, "val"), build_scenes(cfg, "val")
    assert torch.equal(first.pixels, again.pixels) and torch.equal(first.labels, again.labels)
    other = build_scenes(tiny_config(dense={"scene_seed": 1}), "val")
    assert not torch.equal(first.labels, other.labels)
    assert first.pixels.shape == (cfg.dense.val_scenes, 1, 56, 56) and first.num_labels == 11
    assert 0.0 <= first.pixels.min() and first.pixels.max() <= 1.0


@needs_fashion_mnist
def test_splits_compose_scenes_from_disjoint_items():
    cfg = tiny_config()
    scenes = {split: build_scenes(cfg, split) for split in ("train", "val", "test")}
    used = {split: set(s.source_items[s.source_items >= 0].tolist()) for split, s in scenes.items()}
    assert scenes["train"].source == scenes["val"].source == "train"
    assert scenes["test"].source == "test"
    assert used["train"].isdisjoint(used["val"])
    # the pipeline's own hold-out: the val scenes use only the images build_dataset holds out
    train_data = build_dataset(cfg.data, "train", None)
    val_data = build_dataset(cfg.data, "val", None)
    assert used["train"] <= set(source_indices(train_data, torch.arange(len(train_data))).tolist())
    assert used["val"] <= set(source_indices(val_data, torch.arange(len(val_data))).tolist())
    _, val_idx = train_val_indices(cfg.data.train_subset, cfg.data.val_fraction, cfg.data.split_seed)
    assert len(val_data) == len(val_idx)
    # each index names the very image pasted: train/val from the training file, test from the test file
    source = {"train": build_dataset(cfg.data, "train", None), "test": build_dataset(cfg.data, "test", None)}
    for split, s in scenes.items():
        files = source["test" if split == "test" else "train"]
        while isinstance(files, torch.utils.data.Subset):
            files = files.dataset
        top_item_matches_its_source(s, files.images, cfg.data.img_size)


@needs_fashion_mnist
def test_the_canvas_is_twice_the_image_size():
    cfg = tiny_config(data={"img_size": 32}, dense={"val_scenes": 2})
    assert canvas_size(cfg) == 64
    assert build_scenes(cfg, "val").labels.shape == (2, 64, 64)


def test_min_items_above_max_items_is_a_config_error():
    with pytest.raises(ConfigError, match="dense.min_items"):
        build_config("tiny", {"dense": {"min_items": 5, "max_items": 3}})


# --------------------------------------------------------------------------------------------
# The encoder on the larger canvas
# --------------------------------------------------------------------------------------------
def random_encoder(img_size: int = 28):
    cfg = build_config("tiny", {"data": {"img_size": img_size}})
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, cfg.data).eval()
    with torch.no_grad():
        encoder.cls_token.normal_()  # not zeros, so the CLS path matters
        encoder.pos_embed[:, 0].normal_()  # a CLS position embedding of its own, kept as it is
    return cfg, encoder


def test_resize_encoder_equals_a_fresh_encoder_at_the_new_size_with_the_same_weights():
    cfg, encoder = random_encoder()
    resized = resize_encoder(encoder, 56)
    fresh = build_encoder(cfg.model, dataclasses.replace(cfg.data, img_size=56)).eval()
    state = {k: v for k, v in encoder.state_dict().items() if k != "pos_embed"}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert (missing, unexpected) == (["pos_embed"], [])
    with torch.no_grad():
        fresh.pos_embed[:, 0] = encoder.pos_embed[:, 0]
    grid = 56 // cfg.model.patch_size
    assert resized.pos_embed.shape == (1, 1 + grid * grid, cfg.model.embed_dim)
    assert torch.allclose(resized.pos_embed[0, 1:], sincos_2d(cfg.model.embed_dim, grid))
    assert torch.equal(resized.pos_embed, fresh.pos_embed)
    x = torch.randn(3, 1, 56, 56)
    with torch.no_grad():
        assert torch.allclose(resized.forward_features(x), fresh.forward_features(x), atol=1e-6)
    assert encoder.pos_embed.shape[1] == 1 + 7 * 7  # the original is untouched
    assert encoder.patch_embed.img_size == (28, 28)


def test_resize_encoder_to_the_same_size_changes_nothing():
    _, encoder = random_encoder()
    same = resize_encoder(encoder, 28)
    assert torch.equal(same.pos_embed, encoder.pos_embed)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(same.forward_features(x), encoder.forward_features(x))


def test_resize_encoder_refuses_a_learned_position_embedding():
    _, encoder = random_encoder()
    with torch.no_grad():
        encoder.pos_embed[:, 1:] += 0.1
    with pytest.raises(ValueError, match="sine-cosine"):
        resize_encoder(encoder, 56)


# --------------------------------------------------------------------------------------------
# The probe and its scores
# --------------------------------------------------------------------------------------------
def quadrant_scenes(num: int, grid: int, patch: int, num_labels: int, seed: int):
    """Label maps made of four constant quadrants [S, H, W] and features that encode the label
    of each patch (one-hot plus noise) [S, G, G, D]."""
    gen = torch.Generator().manual_seed(seed)
    quads = torch.randint(num_labels, (num, 2, 2), generator=gen)  # [S, 2, 2]
    patch_labels = quads.repeat_interleave(grid // 2, 1).repeat_interleave(grid // 2, 2)  # [S, G, G]
    labels = patch_labels.repeat_interleave(patch, 1).repeat_interleave(patch, 2)  # [S, H, W]
    features = F.one_hot(patch_labels, 16).float()  # [S, G, G, 16]
    features = features + 0.1 * torch.randn(features.shape, generator=gen)  # [S, G, G, 16]
    return features, labels


def test_the_probe_learns_a_separable_case():
    cfg = DenseConfig(epochs=10, lr=3e-2, batch_size=16)
    train_x, train_y = quadrant_scenes(64, 8, 4, 5, seed=0)
    test_x, test_y = quadrant_scenes(32, 8, 4, 5, seed=1)
    probe = train_dense_probe(train_x, train_y, 5, cfg, seed=0)
    pred = predict_maps(probe, test_x, 32)  # [S, 32, 32]
    scores = dense_scores(pred, test_y, 5)
    assert scores["pixel_acc"] >= 95.0 and scores["miou"] >= 90.0


def test_the_probe_is_seeded():
    cfg = DenseConfig(epochs=2, batch_size=16)
    x, y = quadrant_scenes(32, 8, 4, 3, seed=0)
    a, b = (train_dense_probe(x, y, 3, cfg, seed=5) for _ in range(2))
    assert torch.equal(a.linear.weight, b.linear.weight)


def test_pixel_logits_upsample_bilinearly():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0, :, 0] = 1.0  # label 0 wins on the left column of patches
    up = pixel_logits(logits, 8)  # [1, 2, 8, 8]
    assert up.shape == (1, 2, 8, 8)
    assert (up[0].argmax(0)[:, :4] == 0).all() and (up[0, 0, :, 4:] < 0.5).all()


def test_miou_and_pixel_accuracy_on_a_hand_made_example():
    truth = torch.tensor([[0, 0, 1], [1, 2, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    confusion = confusion_matrix(pred, truth, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # IoU: label 0: 1 / (2 + 2 - 1) = 1/3; label 1: 2 / (2 + 3 - 2) = 2/3; label 2: 1 / (2 + 1 - 1) = 1/2
    assert mean_iou(confusion) == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert pixel_accuracy(confusion) == pytest.approx(100 * 4 / 6)


def test_miou_leaves_out_labels_absent_from_the_truth():
    truth = torch.tensor([[0, 0], [1, 1]])
    pred = torch.tensor([[0, 3], [1, 1]])  # label 3 predicted, never true; label 2 nowhere
    # label 0: 1 / (2 + 1 - 1) = 1/2; label 1: 2 / 2 = 1; labels 2 and 3 left out
    assert mean_iou(confusion_matrix(pred, truth, 4)) == pytest.approx(75.0)
    assert dense_scores(pred, truth, 4) == {"miou": 75.0, "pixel_acc": 75.0}


# --------------------------------------------------------------------------------------------
# Bounded memory: the pixel logits in pieces
# --------------------------------------------------------------------------------------------
def computed_bytes(images: slice, rows: slice, num_labels: int, grid: int, size: int) -> int:
    """Bytes of float32 pixel logits one piece makes, its band's margin rows included."""
    if rows == slice(0, grid):
        pixel_rows_made = size
    else:
        pixel_rows_made = (min(rows.stop + 1, grid) - max(rows.start - 1, 0)) * (size // grid)
    return 4 * (images.stop - images.start) * num_labels * pixel_rows_made * size


def assert_pieces_cover_once(chunks, num_images: int, grid: int) -> None:
    covered = torch.zeros(num_images, grid, dtype=torch.int64)  # [B, G] pieces per patch row
    for images, rows in chunks:
        covered[images, rows] += 1
    assert (covered == 1).all()


@pytest.mark.parametrize("num_images", [128, 256])  # the probe's batch, predict_maps' batch
def test_paper_preset_logits_are_made_under_the_budget(num_images):
    cfg = build_config("paper", {"data": {"root": "/imagenet"}})
    size, labels = canvas_size(cfg), 1 + 1000  # 448 px, ImageNet's classes and background
    grid = size // cfg.model.patch_size  # 28
    assert 4 * num_images * labels * size * size > 100e9  # all at once: over 100 GB
    chunks = logit_chunks(num_images, labels, grid, size)
    assert_pieces_cover_once(chunks, num_images, grid)
    assert max(computed_bytes(*c, labels, grid, size) for c in chunks) <= LOGIT_BUDGET_BYTES


def test_logits_of_one_image_over_budget_are_made_in_bands_of_patch_rows():
    labels, grid, size = 1001, 56, 896  # the paper preset on a 4x canvas: 3.2 GB per image
    chunks = logit_chunks(3, labels, grid, size)
    assert_pieces_cover_once(chunks, 3, grid)
    assert all(images.stop - images.start == 1 and rows != slice(0, grid)
               for images, rows in chunks)
    assert max(computed_bytes(*c, labels, grid, size) for c in chunks) <= LOGIT_BUDGET_BYTES
    least = logit_chunks(1, labels, grid, size, budget=1)  # a band holds one patch row at least
    assert [rows for _, rows in least] == [slice(r, r + 1) for r in range(grid)]


@pytest.mark.parametrize("preset, batch", [("default", 128), ("default", 256), ("tiny", 32)])
def test_small_configurations_make_their_logits_in_one_piece(preset, batch):
    cfg = build_config(preset, {"data": {"download": False}})
    size = canvas_size(cfg)
    grid = size // cfg.model.patch_size
    assert logit_chunks(batch, 11, grid, size) == [(slice(0, batch), slice(0, grid))]


def patch_logits_and_labels(num: int = 6, labels: int = 5, grid: int = 4, patch: int = 4,
                            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patch logits [num, labels, grid, grid] and label maps [num, grid*patch, grid*patch]."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num, labels, grid, grid, generator=gen)  # [B, K, G, G]
    target = torch.randint(labels, (num, grid * patch, grid * patch), generator=gen)  # [B, H, W]
    return logits, target


@pytest.mark.parametrize("per_piece", ["two images", "one patch row"])
def test_the_loss_in_pieces_equals_the_loss_at_once_and_so_does_its_gradient(per_piece):
    logits, target = patch_logits_and_labels()  # [6, 5, 4, 4], [6, 16, 16]
    image_bytes = 4 * 5 * 16 * 16
    budget = 2 * image_bytes if per_piece == "two images" else 3 * image_bytes // 4
    whole, pieces = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    expected = F.cross_entropy(pixel_logits(whole, 16), target)  # today's loss
    assert len(logit_chunks(6, 5, 4, 16, budget)) > 1
    got = pixel_loss(pieces, target, budget)
    assert abs(got.item() - expected.item()) <= 1e-6
    expected.backward()
    got.backward()
    assert torch.allclose(pieces.grad, whole.grad, atol=1e-8, rtol=1e-5)
    at_once = F.cross_entropy(pixel_logits(logits, 16), target)  # within the default budget
    assert torch.equal(pixel_loss(logits, target), at_once)


def test_peak_logits_of_the_loss_stay_under_the_budget(monkeypatch):
    logits, target = patch_logits_and_labels(num=8, labels=7)  # [8, 7, 4, 4], [8, 16, 16]
    made = []
    interpolate = F.interpolate

    def recording(x, *args, **kwargs):
        out = interpolate(x, *args, **kwargs)
        made.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(F, "interpolate", recording)
    budget = 4 * 7 * 16 * 16  # one image
    pixel_loss(logits.requires_grad_(), target, budget).backward()
    assert len(made) == 8 and max(made) <= budget
    made.clear()
    pixel_loss(logits, target, 3 * budget // 4).backward()  # bands of one patch row (of 4)
    assert len(made) == 8 * 4 and max(made) <= 3 * budget // 4


@pytest.mark.parametrize("patch", [4, 3])  # 3: the interpolation weights are not exact
def test_a_band_of_patch_rows_is_those_rows_of_the_whole_map(patch):
    logits, _ = patch_logits_and_labels(num=2, labels=3, grid=6, patch=patch)  # [2, 3, 6, 6]
    size = 6 * patch
    whole = pixel_logits(logits, size)  # [2, 3, size, size]
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6), slice(0, 6)):
        band = band_logits(logits, rows, size)  # [2, 3, h, size]
        part = whole[:, :, rows.start * patch:rows.stop * patch]
        assert band.shape == part.shape
        if patch == 4:
            assert torch.equal(band, part)
        else:
            assert torch.allclose(band, part, atol=1e-6)


def test_maps_predicted_in_pieces_equal_the_maps_at_once():
    train_x, train_y = quadrant_scenes(32, 8, 4, 5, seed=0)
    probe = train_dense_probe(train_x, train_y, 5, DenseConfig(epochs=2, batch_size=16), seed=0)
    test_x = quadrant_scenes(10, 8, 4, 5, seed=1)[0] + torch.randn(10, 8, 8, 16)  # near ties too
    whole = predict_maps(probe, test_x, 32)  # [10, 32, 32]
    image_bytes = 4 * 5 * 32 * 32
    for budget in (3 * image_bytes, image_bytes // 2, 1):  # images, bands, single patch rows
        assert torch.equal(predict_maps(probe, test_x, 32, batch_size=4, budget=budget), whole)


def test_a_probe_trained_on_the_loss_in_pieces_matches_the_probe_trained_at_once():
    cfg = DenseConfig(epochs=2, batch_size=16)
    x, y = quadrant_scenes(32, 8, 4, 5, seed=0)
    whole = train_dense_probe(x, y, 5, cfg, seed=0)
    pieces = train_dense_probe(x, y, 5, cfg, seed=0, budget=4 * 5 * 32 * 32 // 2)  # half an image
    for a, b in zip(whole.state_dict().values(), pieces.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(whole.linear.weight, train_dense_probe(x, y, 5, cfg, seed=0).linear.weight)


# --------------------------------------------------------------------------------------------
# End to end, and the figure
# --------------------------------------------------------------------------------------------
@needs_fashion_mnist
def test_dense_probe_of_an_exported_random_encoder(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    path = tmp_path / "encoder.pt"
    checkpoint.export_encoder(build_encoder(cfg.model, cfg.data), cfg, path)
    metrics = dense_probe(cfg, path, progress=False)
    assert {split: set(scores) for split, scores in metrics.items()} == {
        "val": {"miou", "pixel_acc"}, "test": {"miou", "pixel_acc"}}
    assert all(0.0 <= v <= 100.0 for scores in metrics.values() for v in scores.values())


def test_label_colours_are_fixed_per_class():
    small, large = label_colours(4), label_colours(14)
    assert torch.equal(small, large[:4])
    assert small[0].tolist() == [0.0, 0.0, 0.0]  # background: black
    assert len({tuple(c) for c in large.tolist()}) == 14  # every label its own colour


def test_draw_dense_predictions_lays_out_scenes_truth_and_each_encoder():
    _, _, pixels, labels = draw(0, num_scenes=3)
    preds = {"mae": labels.roll(1, -1), "pemae": labels}
    fig = draw_dense_predictions(pixels, labels, preds, class_names=["a", "b", "c"])
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 3 * 4  # 3 scenes x (scene, truth, mae, pemae)
    assert [ax.get_ylabel() for ax in fig.axes[::3][:4]] == ["scene", "truth", "mae", "pemae"]
    plt.close(fig)
    rgb = draw_dense_predictions(torch.rand(2, 3, 8, 8), labels[:2, :8, :8], {})
    plt.close(rgb)
