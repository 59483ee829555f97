"""The training loops end to end on tiny configs (determinism, logs, summaries), the frozen-feature
evaluations on synthetic features, and fine-tuning."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from conftest import fashion_mnist_installed, needs_fashion_mnist, run_pretrain, tiny_config
from pemae.config.params import build_config
from pemae.config.schema import ConfigError, EvalConfig
from pemae.engine import checkpoint
from pemae.engine import finetune as finetune_module
from pemae.engine.batching import peak_lr
from pemae.engine.finetune import classifier_from_encoder, finetune, protocol
from pemae.engine.pretrain import pretrain
from pemae.engine.runtime import MetricLog, pick_device, read_log
from pemae.engine.schedules import warmup_cosine
from pemae.eval.probes import (encoder_readouts, evaluate_encoder, evaluate_pixels, knn_accuracy,
                               linear_probe_accuracy, pixel_readout)
from pemae.models.encoder import build_encoder

MAE = {"name": "mae"}  # these tests are about the MAE baseline's loop and checkpoints

LOG_COLUMNS = ["step", "epoch", "lr", "images_per_s", "peak_mem_mb", "loss", "loss_rec", "skipped_images"]


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


# --------------------------------------------------------------------------------------------
# Pretraining: determinism, log, summary
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """Three 3-step runs (192 images, batch 64, a row every 2 steps): seeds 0, 0 and 1."""
    if not fashion_mnist_installed():
        pytest.skip("real Fashion-MNIST not installed")
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = tiny_config(data={"train_subset": 192}, method=MAE, pretrain={"seed": seed, "log_every": 2})
        runs[name] = run_pretrain(cfg, tmp_path_factory.mktemp(f"short_{name}"))
    return runs


@needs_fashion_mnist
def test_pretraining_with_the_same_seed_is_bit_identical(short_runs):
    a, b = short_runs["a"].model.state_dict(), short_runs["b"].model.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert short_runs["a"].summary["final_loss"] == short_runs["b"].summary["final_loss"]
    assert (short_runs["a"].out_dir / "checkpoint.pt").is_file()


@needs_fashion_mnist
def test_pretraining_with_another_seed_differs(short_runs):
    a, c = short_runs["a"].model.state_dict(), short_runs["c"].model.state_dict()
    differing = [name for name in a if not torch.equal(a[name], c[name])]
    assert "encoder.blocks.0.attn.qkv.weight" in differing
    assert "decoder_pred.weight" in differing


@needs_fashion_mnist
def test_log_rows_at_every_log_every_step_and_the_last(short_runs):
    columns, rows = read_csv(short_runs["a"].out_dir / "log.csv")
    assert columns == LOG_COLUMNS
    assert [int(r["step"]) for r in rows] == [2, 3]  # every 2 steps, and the final step 3


def test_pretrain_log_has_one_row_per_step_with_the_schedule(tiny_run):
    columns, rows = read_csv(tiny_run.out_dir / "log.csv")
    assert columns == LOG_COLUMNS
    assert [int(r["step"]) for r in rows] == list(range(1, 9))  # tiny: log_every 1, 8 steps
    pc = tiny_run.cfg.pretrain
    lr = peak_lr(pc.batch_size, pc.base_lr)
    warmup = round(pc.warmup_epochs * 8)
    for r in rows:
        step = int(r["step"])
        assert float(r["epoch"]) == pytest.approx(step / 8)
        # the logged lr is the one used for that step (scheduled at step - 1)
        assert float(r["lr"]) == pytest.approx(warmup_cosine(step - 1, 8, lr, pc.min_lr, warmup),
                                               rel=1e-5, abs=1e-12)
        assert math.isfinite(float(r["loss"])) and float(r["loss"]) > 0
        assert float(r["loss_rec"]) == float(r["loss"])
        assert float(r["images_per_s"]) > 0
    assert float(rows[0]["lr"]) == 0.0
    assert float(rows[warmup]["lr"]) == pytest.approx(lr)
    log = read_log(tiny_run.out_dir / "log.csv")
    assert list(log) == LOG_COLUMNS and len(log["step"]) == 8


def test_pretrain_summary(tiny_run):
    summary = json.loads((tiny_run.out_dir / "summary.json").read_text())
    assert summary == tiny_run.summary
    assert summary["steps"] == 8 and summary["images_seen"] == 512
    _, rows = read_csv(tiny_run.out_dir / "log.csv")
    assert summary["final_loss"] == pytest.approx(float(rows[-1]["loss"]), rel=1e-5)


@needs_fashion_mnist
def test_pretrain_with_zero_epochs_saves_the_initialisation(tmp_path):
    cfg = tiny_config(method=MAE, pretrain={"epochs": 0})
    run = run_pretrain(cfg, tmp_path)
    assert run.summary["steps"] == 0 and run.summary["final_loss"] is None
    blob = checkpoint.load(tmp_path / "checkpoint.pt")
    assert blob["step"] == 0
    assert torch.equal(blob["model"]["decoder_pred.weight"], run.model.decoder_pred.weight)
    assert (tmp_path / "encoder.pt").is_file() and (tmp_path / "summary.json").is_file()


@needs_fashion_mnist
def test_pretrain_with_zero_epochs_writes_every_declared_output(tmp_path):
    """dvc.yaml declares log.csv a plot output of every pretrain stage, the `random` run included."""
    pretrain(tiny_config(method=MAE, pretrain={"epochs": 0}), tmp_path, progress=False)
    for name in ("checkpoint.pt", "encoder.pt", "config.yaml", "summary.json", "log.csv"):
        assert (tmp_path / name).is_file(), name
    assert read_log(tmp_path / "log.csv") == {}


@needs_fashion_mnist
def test_pretrain_batch_larger_than_the_dataset_is_a_config_error(tmp_path):
    cfg = tiny_config(data={"train_subset": 32}, method=MAE)
    with pytest.raises(ConfigError, match="pretrain.batch_size"):
        pretrain(cfg, tmp_path, progress=False)


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="finetune.device"):
            pick_device("cuda", key="finetune.device")


def test_metric_log_replaces_an_old_file_and_formats_floats(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("stale\n")
    log = MetricLog(path)
    assert not path.exists()
    log.append(step=1, loss=0.123456789)
    log.append(step=2, loss=2.0)
    log.close()
    assert path.read_text().splitlines() == ["step,loss", "1,0.123457", "2,2"]
    assert read_log(path)["loss"].tolist() == [0.123457, 2.0]


def test_metric_log_with_no_rows_leaves_an_empty_table(tmp_path):
    log = MetricLog(tmp_path / "log.csv")
    log.close()
    assert (tmp_path / "log.csv").is_file()
    assert read_log(tmp_path / "log.csv") == {}


# --------------------------------------------------------------------------------------------
# k-NN and linear probe on synthetic features
# --------------------------------------------------------------------------------------------
def clusters(n_per_class: int, classes: int = 3, dim: int = 8, noise: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:classes] * 5  # orthogonal directions: far apart in cosine
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + noise * torch.randn(len(y), dim, generator=g)
    return x, y


def test_knn_separated_clusters_give_100():
    train_x, train_y = clusters(40, seed=0)
    test_x, test_y = clusters(15, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=20) == 100.0
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=5, chunk=4) == 100.0


def test_knn_wrong_labels_give_0():
    train_x, train_y = clusters(40, seed=0)
    test_x, test_y = clusters(15, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, (test_y + 1) % 3, k=20) == 0.0


def test_knn_random_labels_are_near_chance():
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(600, 16, generator=g), torch.randn(600, 16, generator=g)
    train_y = torch.randint(0, 3, (600,), generator=g)
    test_y = torch.randint(0, 3, (600,), generator=g)
    acc = knn_accuracy(train_x, train_y, test_x, test_y, k=20)
    assert 100 / 3 - 8 < acc < 100 / 3 + 8


def test_knn_by_hand_temperature_weights_the_votes():
    # cosine similarities to the test point (1, 0): a 1.0 (class 0), b 0.8 and c 0.6 (class 1),
    # d -1.0 (class 0). With k = 3, class 1 has the majority (b, c), but at T = 0.07
    # exp(1/T) > exp(0.8/T) + exp(0.6/T), so class 0 wins; at T = 1, e^1 = 2.72 < e^0.8 + e^0.6 = 4.05.
    train_x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]]) * 3
    train_y = torch.tensor([0, 1, 1, 0])
    test_x, test_y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=3, temperature=0.07) == 100.0
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=3, temperature=1.0) == 0.0
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=1, temperature=1.0) == 100.0
    # k larger than the training set is clipped: all 4 vote; class 0 gets e^1 + e^-1 = 3.09 < 4.05
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=50, temperature=1.0) == 0.0
    # two test points, one right one wrong: 50 %
    assert knn_accuracy(train_x, train_y, torch.tensor([[2.0, 0.0], [0.0, 1.0]]),
                        torch.tensor([0, 0]), k=1) == 50.0


def probe_config(**values) -> EvalConfig:
    base = dict(linear_epochs=10, linear_lr=0.1, linear_batch_size=64, seed=0)
    return build_config("default", {"evaluation": {**base, **values}}).evaluation


def test_linear_probe_separates_linearly_separable_data():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 10, generator=g)

    def sample(n):
        x = torch.randn(n, 10, generator=g) * 2 + 1  # not centred: the probe's BatchNorm handles it
        scores = x @ w.T  # [n, 3]
        top2 = scores.topk(2, dim=1).values
        keep = top2[:, 0] - top2[:, 1] > 1.0  # a margin: strictly linearly separable
        return x[keep], scores.argmax(1)[keep]

    (train_x, train_y), (test_x, test_y) = sample(800), sample(400)
    assert len(test_y.unique()) == 3
    acc = linear_probe_accuracy(train_x, train_y, test_x, test_y, probe_config())
    assert acc > 95


def test_linear_probe_random_labels_near_chance_and_deterministic():
    g = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(300, 10, generator=g), torch.randn(300, 10, generator=g)
    train_y, test_y = torch.randint(0, 3, (300,), generator=g), torch.randint(0, 3, (300,), generator=g)
    cfg = probe_config(linear_epochs=5)
    acc = linear_probe_accuracy(train_x, train_y, test_x, test_y, cfg)
    assert acc < 100 / 3 + 12
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y, cfg) == acc


def test_evaluate_encoder_end_to_end(tiny_run):
    cfg = tiny_run.cfg
    result = evaluate_encoder(cfg, tiny_run.out_dir / "encoder.pt", progress=False)
    assert set(result) == {"val", "test"}
    for split in ("val", "test"):
        assert set(result[split]) == {"cls", "avg"}
        for readout in ("cls", "avg"):
            assert set(result[split][readout]) == {"knn_top1", "linear_top1"}
            assert all(0 <= v <= 100 for v in result[split][readout].values())
    # Fashion-MNIST has 10 balanced classes: even a barely trained ViT's features beat chance
    assert 20 < result["test"]["cls"]["knn_top1"] <= 100


def test_readouts_are_the_cls_token_and_the_mean_patch_token():
    torch.manual_seed(0)
    cfg = build_config("tiny")
    encoder = build_encoder(cfg.model, cfg.data).eval()
    imgs = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        tokens = encoder.forward_features(imgs)  # [3, 1+49, 64]
        feats = encoder_readouts(encoder)(imgs)
    assert torch.equal(feats["cls"], tokens[:, 0])
    assert torch.allclose(feats["avg"], tokens[:, 1:].mean(1))
    assert torch.equal(pixel_readout(imgs)["pixels"], imgs.reshape(3, -1))


@needs_fashion_mnist
def test_pixel_baseline_scores_val_and_test_without_an_encoder():
    cfg = tiny_config(evaluation={"linear_epochs": 3})
    result = evaluate_pixels(cfg, progress=False)
    assert set(result) == {"val", "test"} and set(result["test"]) == {"pixels"}
    # raw pixels of Fashion-MNIST are far above chance for k-NN even with 460 training images
    assert result["test"]["pixels"]["knn_top1"] > 50
    assert result == evaluate_pixels(cfg, progress=False)  # deterministic


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------
def exported_encoder(tmp_path, cfg, name="enc.pt"):
    torch.manual_seed(0)
    enc = build_encoder(cfg.model, cfg.data)
    with torch.no_grad():
        enc.norm.weight.copy_(torch.randn_like(enc.norm.weight))
        enc.norm.bias.copy_(torch.randn_like(enc.norm.bias))
    checkpoint.export_encoder(enc, cfg, tmp_path / name)
    return enc, tmp_path / name


def test_classifier_with_avg_pool_copies_norm_to_fc_norm(tmp_path):
    cfg = build_config("tiny", {"finetune": {"global_pool": "avg"}})
    enc, path = exported_encoder(tmp_path, cfg)
    vit = classifier_from_encoder(path, cfg, classes=7)
    assert torch.equal(vit.fc_norm.weight, enc.norm.weight)
    assert torch.equal(vit.fc_norm.bias, enc.norm.bias)
    assert isinstance(vit.norm, torch.nn.Identity)
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, enc.blocks[1].mlp.fc2.weight)
    assert torch.equal(vit.patch_embed.proj.weight, enc.patch_embed.proj.weight)
    assert vit.head.weight.shape == (7, 64)
    assert torch.all(vit.head.bias == 0) and vit.head.weight.abs().max() < 1e-3
    assert vit(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_classifier_with_token_pool_keeps_norm(tmp_path):
    cfg = build_config("tiny", {"finetune": {"global_pool": "token"}})
    enc, path = exported_encoder(tmp_path, cfg)
    vit = classifier_from_encoder(path, cfg, classes=10).eval()
    assert torch.equal(vit.norm.weight, enc.norm.weight)
    imgs = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(vit.forward_head(vit.forward_features(imgs), pre_logits=True),
                              enc.eval()(imgs), atol=1e-6)


def test_classifier_from_an_encoder_of_another_depth_is_a_clear_error(tmp_path):
    cfg = build_config("tiny")
    _, path = exported_encoder(tmp_path, build_config("tiny", {"model": {"depth": 3}}))
    with pytest.raises(ValueError, match="does not match the config"):
        classifier_from_encoder(path, cfg, classes=10)


def test_classifier_from_an_encoder_of_another_width_is_a_clear_error(tmp_path):
    cfg = build_config("tiny")
    _, path = exported_encoder(tmp_path, build_config("tiny", {"model": {"embed_dim": 32}}))
    with pytest.raises(ValueError, match="enc.pt.*does not match the config"):
        classifier_from_encoder(path, cfg, classes=10)


def test_finetune_end_to_end_from_a_tiny_pretrain(tiny_run, tmp_path):
    cfg = tiny_run.cfg
    summary = finetune(cfg, tiny_run.out_dir / "encoder.pt", tmp_path / "ft", progress=False)
    written = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert written == summary
    assert 0 <= written["val_top1"] <= 100 and 0 <= written["test_top1"] <= 100
    assert written["epochs"] == 1 and written["labelled_images"] == cfg.finetune.train_subset
    assert written["protocol"] == "fine-tuned (layer decay 0.75)"
    columns, rows = read_csv(tmp_path / "ft" / "log.csv")
    assert columns == ["step", "epoch", "loss", "val_top1"]  # the test split is not in the log
    assert len(rows) == 1 and int(rows[0]["step"]) == 256 // 64
    assert float(rows[0]["val_top1"]) == pytest.approx(written["val_top1"], abs=0.01)
    assert math.isfinite(float(rows[0]["loss"]))


def test_finetune_search_leaves_the_test_split_unread(tiny_run, tmp_path, monkeypatch):
    read = []
    real = finetune_module.build_dataset
    monkeypatch.setattr(finetune_module, "build_dataset",
                        lambda cfg, split, transform: read.append(split) or real(cfg, split, transform))
    summary = finetune(tiny_run.cfg, tiny_run.out_dir / "encoder.pt", tmp_path / "ft",
                       progress=False, test=False)
    assert "test" not in read and "test_top1" not in summary and "val_top1" in summary


def test_an_unpretrained_encoder_is_labelled_from_scratch():
    cfg = build_config("tiny", {"pretrain": {"epochs": 0}, "finetune": {"layer_decay": 1.0}})
    assert protocol(cfg) == "from scratch (layer decay 1)"


@needs_fashion_mnist
def test_finetune_subset_larger_than_the_train_set_is_a_config_error(tmp_path):
    cfg = tiny_config(method=MAE, finetune={"train_subset": 600})  # data.train_subset = 512
    enc_path = exported_encoder(tmp_path, cfg)[1]
    with pytest.raises(ConfigError, match="finetune.train_subset"):
        finetune(cfg, enc_path, tmp_path / "ft", progress=False)
