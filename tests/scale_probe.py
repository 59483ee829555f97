"""Run under `torchrun --nproc_per_node 2` by test_scale_eval.py, with an exported encoder and a
scratch folder: sharded evaluation against what one process computes, and a DDP fine-tuning run
stopped after a checkpoint and resumed against an uninterrupted one. Prints one "ok <check>"
line per check passed (on every rank)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pemae.config.params import build_config
from pemae.data.datasets import build_dataset
from pemae.data.transforms import eval_transform
from pemae.engine import checkpoint, distributed, finetune as finetune_module
from pemae.engine.finetune import accuracy, classifier_from_encoder, finetune, split_accuracy
from pemae.eval.dense import (dense_probe_encoder, patch_features, resize_encoder,
                              sharded_patch_features)
from pemae.eval.probes import (encoder_readouts, evaluate_features, extract_features, knn_accuracy,
                               split_features)
from pemae.eval.scenes import build_scenes

SINGLE = distributed.Processes()


def tiny(**sections) -> object:
    """The tiny preset on the CPU with small evaluation batches, so that both processes get
    whole batches of most splits (and rank 1 none of the 57 validation images)."""
    base = {"data": {"download": False}, "pretrain": {"device": "cpu"},
            "evaluation": {"batch_size": 64, "linear_epochs": 2},
            "dense": {"train_scenes": 48, "val_scenes": 16, "test_scenes": 40, "epochs": 1}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return build_config("tiny", base)


def check_features(cfg, featurise, procs) -> None:
    for split in ("train", "val", "test"):
        dataset = build_dataset(cfg.data, split, eval_transform(cfg.data))
        feats, labels = split_features(featurise, dataset, cfg, torch.device("cpu"), procs, False)
        whole = DataLoader(dataset, batch_size=cfg.evaluation.batch_size)
        ref_feats, ref_labels = extract_features(featurise, whole, torch.device("cpu"), False)
        assert torch.equal(labels, ref_labels), split
        assert feats.keys() == ref_feats.keys() and all(torch.equal(feats[k], ref_feats[k]) for k in feats), split
    print("ok split_features")


def check_knn(procs) -> None:
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(60, 8, generator=gen), torch.randn(37, 8, generator=gen)  # [N, D]
    train_y, test_y = torch.randint(0, 3, (60,), generator=gen), torch.randint(0, 3, (37,), generator=gen)
    assert knn_accuracy(train_x, train_y, test_x, test_y, 5, chunk=8, procs=procs) == \
        knn_accuracy(train_x, train_y, test_x, test_y, 5, chunk=8)
    print("ok knn_accuracy")


def check_gather_rows(procs) -> None:
    mine = torch.arange(3 * (procs.rank + 1) * 2).view(-1, 2) + 100 * procs.rank  # [3 or 6, 2]
    gathered = distributed.gather_rows(mine, procs)
    expected = torch.cat([torch.arange(6).view(-1, 2), torch.arange(12).view(-1, 2) + 100])
    assert torch.equal(gathered, expected), gathered
    print("ok gather_rows")


def check_evaluate(cfg, featurise, procs) -> None:
    cpu = torch.device("cpu")
    assert evaluate_features(cfg, featurise, cpu, False, procs) == evaluate_features(cfg, featurise, cpu, False)
    print("ok evaluate_features")


def check_dense(cfg, encoder, procs) -> None:
    cpu = torch.device("cpu")
    canvas = resize_encoder(encoder, 2 * cfg.data.img_size).eval()
    pixels = build_scenes(cfg, "test").pixels  # [40, C, H, W]: 2 batches of 32 scenes
    cfg_32 = tiny(evaluation={"batch_size": 32})
    assert torch.equal(sharded_patch_features(canvas, pixels, cfg_32, cpu, procs),
                       patch_features(canvas, pixels, cfg.data, 32, cpu))
    shared = dense_probe_encoder(cfg_32, encoder, cpu, False, procs).metrics
    assert shared == dense_probe_encoder(cfg_32, encoder, cpu, False).metrics, shared
    print("ok dense")


def check_accuracy(cfg, encoder_path, procs) -> None:
    torch.manual_seed(0)  # the same head on both ranks
    model = classifier_from_encoder(encoder_path, cfg, 10)
    dataset = build_dataset(cfg.data, "test", eval_transform(cfg.data))
    whole = accuracy(model, DataLoader(dataset, batch_size=cfg.evaluation.batch_size), torch.device("cpu"))
    assert split_accuracy(model, dataset, cfg, torch.device("cpu"), procs) == whole
    print("ok split_accuracy")


class Stop(Exception):
    """Raised on every rank right after the checkpoint of step `at`: a killed run."""


def check_finetune_resume(encoder_path: Path, scratch: Path, procs) -> None:
    """A DDP run stopped after its mid-epoch checkpoint (step 6 of 8), resumed: the same final
    weights and log as an uninterrupted DDP run (random crops, flips and drop path on)."""
    cfg = tiny(finetune={"epochs": 2, "checkpoint_every": 3, "crop_min_scale": 0.5})
    finetune(cfg, encoder_path, scratch / "whole", progress=False)
    save = finetune_module.save_checkpoint

    def save_then_stop(path, model, optimizer, cfg, step, *args):
        save(path, model, optimizer, cfg, step, *args)
        if step == 6:
            raise Stop

    finetune_module.save_checkpoint = save_then_stop
    try:
        finetune(cfg, encoder_path, scratch / "resumed", progress=False)
        raise AssertionError("the run was not stopped")
    except Stop:
        torch.distributed.barrier()  # rank 0 has written last.pt before anyone resumes
    finally:
        finetune_module.save_checkpoint = save
    assert checkpoint.load(scratch / "resumed" / "last.pt")["step"] == 6
    finetune(cfg, encoder_path, scratch / "resumed", progress=False)
    whole, resumed = (checkpoint.load(scratch / name / "checkpoint.pt") for name in ("whole", "resumed"))
    assert len(whole["rng"]) == 2 and whole["step"] == resumed["step"] == 8
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    logs = [(scratch / name / "log.csv").read_text() for name in ("whole", "resumed")]
    assert logs[0] == logs[1], logs
    assert not (scratch / "resumed" / "last.pt").exists()
    print("ok finetune_resume")


def main() -> None:
    encoder_path, scratch = Path(sys.argv[1]), Path(sys.argv[2])
    procs, _ = distributed.start("cpu")
    assert procs.world_size == 2, procs
    cfg = tiny()
    encoder = checkpoint.load_encoder(encoder_path).eval()
    featurise = encoder_readouts(encoder)
    check_gather_rows(procs)
    check_knn(procs)
    check_features(cfg, featurise, procs)
    check_evaluate(cfg, featurise, procs)
    check_dense(cfg, encoder, procs)
    check_accuracy(cfg, encoder_path, procs)
    check_finetune_resume(encoder_path, scratch, procs)
    distributed.stop(procs)


if __name__ == "__main__":
    main()
