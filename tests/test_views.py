"""The two-view switch (`method.views: 2`): the labelling teacher labels the CLS token of a second
augmented view, the student predicts it from its own masked view (cross-view), and everything on
the student's view (token targets, token pseudo labels, the masking) is what `views: 1` computes.
Tiny models on random 1x28x28 images, K = 64 prototypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from pemae.data.transforms import pretrain_transform
from pemae.engine.optim import param_groups
from pemae.engine.pretrain import train_step
from pemae.engine.sampling import SeededViews
from pemae.models.losses import pseudo_label_loss
from pemae.models.mae import random_masking
from pemae.models.pemae import build_pretrain_model, num_views, stand_in_view2, teacher_cls
from test_engine import FakeImages

SMALL_HEAD = {"num_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16}
CPU = torch.device("cpu")


def build(views: int, seed: int = 0, **method):
    torch.manual_seed(seed)
    cfg = tiny_config(method={**SMALL_HEAD, "views": views, **method})
    return build_pretrain_model(cfg, total_steps=10, steps_per_epoch=5).train()


def images(b: int = 4, seed: int = 123) -> torch.Tensor:
    return torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(seed))  # [B, 1, 28, 28]


def step_terms(model, imgs, noise, view2=None):
    with torch.no_grad():
        return model(imgs, 0, noise=noise, view2=view2)


@pytest.mark.parametrize("method,views", [
    ({"name": "pemae", "views": 2}, 2),
    ({"name": "pemae", "views": 1}, 1),
    ({"name": "pemae", "views": 2, "lambda_cls": 0.0}, 1),  # no CLS pseudo label: nothing to pair
    ({"name": "mae", "views": 2}, 1),  # MAE has no labelling teacher
])
def test_only_a_pemae_with_cls_pseudo_labels_takes_two_views(method, views):
    assert num_views(tiny_config(method=method)) == views


def test_views_must_be_one_or_two_naming_the_key():
    from pemae.config.schema import ConfigError

    with pytest.raises(ConfigError, match="method.views"):
        tiny_config(method={"views": 3})


def test_a_model_refuses_the_wrong_number_of_views():
    imgs = images()
    with pytest.raises(ValueError, match="1 view"):
        build(1)(imgs, 0, view2=imgs)
    with pytest.raises(ValueError, match="2 view"):
        build(2)(imgs, 0)
    with pytest.raises(ValueError, match="one view"):
        build_pretrain_model(tiny_config(method={"name": "mae"}), 10, 5)(imgs, 0, view2=imgs)


@pytest.mark.parametrize("teachers", ["dual", "single"])
def test_two_views_of_the_same_image_give_the_one_view_step(teachers):
    """With view2 = the student's own (unmasked) image the cross-view pairing is the same-view
    one: every loss term and monitor equals the `views: 1` step's."""
    imgs, noise = images(), torch.rand(4, 49)
    one = step_terms(build(1, teachers=teachers), imgs, noise)
    two = step_terms(build(2, teachers=teachers), imgs, noise, view2=imgs.clone())
    assert set(one) == set(two)
    for key in one:
        if one[key].ndim == 0:
            assert torch.allclose(one[key], two[key], rtol=1e-6), key


def test_the_cls_pseudo_label_comes_from_the_second_view_of_the_same_image():
    """loss_cls = CE(labelling teacher's CLS label of view2[i], student CLS of view1[i]); token
    terms are untouched by view2."""
    model = build(2, teacher_temp_start=0.05, student_temp=0.2)
    imgs, view2, noise = images(seed=1), images(seed=2), torch.rand(4, 49)
    out = step_terms(model, imgs, noise, view2)
    with torch.no_grad():
        masking = random_masking(4, model.student.num_patches, model.student.mask_ratio, noise=noise)
        s_cls = model.label_head(model.student.forward_encoder(imgs, masking)[:, 0])  # [B, K]
        teacher = model.lab_teacher
        q = F.softmax(teacher["head"](teacher_cls(teacher["encoder"], view2)) / 0.05, -1)  # [B, K]
        assert torch.allclose(out["loss_cls"], pseudo_label_loss(s_cls, q, 0.2), rtol=1e-5)
        # pairing image i with view i, not with another image's view
        assert not torch.allclose(out["loss_cls"], pseudo_label_loss(s_cls, q.roll(1, 0), 0.2), rtol=1e-3)
    same = step_terms(build(1, teacher_temp_start=0.05, student_temp=0.2), imgs, noise)
    for key in ("loss_rec", "loss_tok", "tok_entropy", "target_std"):
        assert torch.allclose(out[key], same[key], rtol=1e-6), key


def test_labelling_teacher_sees_view2_once_and_the_student_view_only_for_token_labels():
    calls = {"rec": [], "lab": []}
    for lambda_tok in (1.0, 0.0):
        model = build(2, lambda_tok=lambda_tok)
        for name, teacher in model.teacher_set.items():
            teacher["encoder"].blocks.register_forward_hook(
                lambda _m, args, _o, name=name: calls[name].append(args[0].shape[1]))
        step_terms(model, images(), torch.rand(4, 49), images(seed=5))
    # tokens seen per pass: 1 + 49 (the whole student view, then the whole second view)
    assert calls == {"rec": [50, 50], "lab": [50, 50, 50]}


def test_seeded_views_give_a_second_view_after_the_unchanged_first():
    cfg = tiny_config()
    dataset = FakeImages(pretrain_transform(cfg.data))
    one = SeededViews(dataset, seed=0, num_patches=49)
    two = SeededViews(dataset, seed=0, num_patches=49, views=2)
    key = 3 + 2 * len(dataset)
    img, noise = one[key]
    img_b, noise_b, second = two[key]
    assert torch.equal(img, img_b) and torch.equal(noise, noise_b)  # views: 1 data unchanged
    assert second.shape == img.shape and not torch.equal(second, img)  # another crop / flip
    assert all(torch.equal(a, b) for a, b in zip(two[key], (img_b, noise_b, second)))  # seeded
    with pytest.raises(ValueError, match="views = 3"):
        SeededViews(dataset, seed=0, num_patches=49, views=3)


def test_a_two_view_training_step_moves_the_student_and_stand_in_view_is_a_flip():
    model = build(2)
    imgs = images()
    view2 = stand_in_view2(model, imgs)
    assert torch.equal(view2, imgs.flip(-1)) and stand_in_view2(build(1), imgs) is None
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    before = model.label_head.mlp[0].weight.clone()
    terms = train_step(model, optimizer, imgs, CPU, 0, view2=view2)
    assert torch.isfinite(terms["loss"]) and not torch.equal(before, model.label_head.mlp[0].weight)
