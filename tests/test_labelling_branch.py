"""The labelling branch learns: its pseudo labels carry information about the image.

The information monitor (model.py) is the mutual information between an image and its pseudo
label over the batch: entropy of the batch-mean label minus the mean per-image entropy. It is 0
when every image gets the same label (uniform or one cluster) and log K at most.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import needs_fashion_mnist, run_pretrain, tiny_config
from pemae.engine.runtime import read_log
from pemae.models.pemae import PEMAE

STEPS = 16  # two tiny epochs of 8 steps (512 images, batch 64)


def information_of(probs: torch.Tensor) -> float:
    model = PEMAE.__new__(PEMAE)  # only the monitors, which use no module state
    return model.monitors("cls", probs, torch.zeros(1, probs.shape[-1]))["cls_information"].item()


def test_information_is_zero_in_both_collapses_and_log_k_for_confident_spread_labels():
    k = 8
    uniform = torch.full((16, k), 1 / k)  # [16, K]
    one_cluster = torch.zeros(16, k)
    one_cluster[:, 3] = 1.0
    spread = torch.eye(k).repeat(2, 1)  # [16, K]: each cluster twice, one-hot
    assert information_of(uniform) == pytest.approx(0.0, abs=1e-6)
    assert information_of(one_cluster) == pytest.approx(0.0, abs=1e-6)
    assert information_of(spread) == pytest.approx(math.log(k), rel=1e-5)
    half = 0.5 * spread + 0.5 * uniform  # softer labels say less
    assert 0 < information_of(half) < math.log(k)


@needs_fashion_mnist
def test_on_the_tiny_preset_the_pseudo_labels_stay_far_from_uniform_and_informative(tmp_path):
    """Real images, the default method (tiny sizes): within STEPS steps the CLS and token pseudo
    labels are far from uniform and say something about each image and token."""
    torch.set_num_threads(1)
    cfg = tiny_config(pretrain={"epochs": 2, "log_every": 1})
    run = run_pretrain(cfg, tmp_path)
    log = read_log(run.out_dir / "log.csv")
    log_k = math.log(cfg.method.num_prototypes)
    assert len(log["step"]) == STEPS
    for kind in ("cls", "tok"):
        entropy, information = log[f"{kind}_entropy"], log[f"{kind}_information"]
        assert entropy[-1] < 0.8 * log_k, (kind, entropy[-1] / log_k)  # uniform: 1, flagged at 0.95
        assert information[-1] > 0.5, (kind, information[-1])  # nats; 0 when collapsed
        assert (information >= -1e-4).all() and (information <= log_k + 1e-4).all()
    assert run.summary["collapsed"] is False
