"""Frozen-feature evaluations: k-NN (DINO) and a linear probe (MAE), on two readouts of a
pretrained encoder — the CLS token and the average of the patch tokens — or on raw pixels.

Both are fitted on the training split and scored on the validation split (what choices are made
on) and on the test split (the final table), each with the same fitted probe.

Everything runs on the device the encoder runs on (`pretrain.device`: the GPU when there is
one): the features are extracted there, under `pretrain.amp` like pretraining (bf16 on a GPU by
default, fp32 on the CPU), and stay there, in float32, for the k-NN and the linear probe. The
k-NN scores the split against the train bank a chunk of rows at a time (`knn_chunk`: at most
`KNN_BUDGET_BYTES` of similarities in memory, whatever the sizes).

Under `torchrun` every process extracts the features of a contiguous run of whole batches of each
split (`pemae.engine.distributed.batch_shard`: the batches one process would form, so the features are
its own, bit for bit), and the runs are gathered, in dataset order, on the main process alone.
It fits the linear probe and runs the k-NN there, once, exactly as one process does (the probe
is small beside the extraction; training it whole rather than with DDP keeps its BatchNorm
statistics and its steps those of one process), and broadcasts the scores (a few floats) to
the others. So the scores equal one process's, on every process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from pemae.config.schema import Config, EvalConfig
from pemae.data.datasets import build_dataset, eval_batches
from pemae.data.transforms import eval_transform
from pemae.engine import checkpoint, distributed
from pemae.engine.optim import set_lr
from pemae.engine.runtime import autocast, seed_everything
from pemae.engine.schedules import warmup_cosine


Featuriser = Callable[[torch.Tensor], dict[str, torch.Tensor]]

LARS_MOMENTUM = 0.9  # MAE's LARS (its util/lars.py, from MoCo v3)
LARS_TRUST_COEFF = 0.001
KNN_BUDGET_BYTES = 1 << 30  # float32 similarities of one k-NN chunk (test rows x train bank)
SCORES = ("knn_top1", "linear_top1")  # what each readout of each scored split gets


def encoder_readouts(encoder: nn.Module) -> Featuriser:
    """Images [B, C, H, W] -> {"cls": [B, D], "avg": [B, D]}: the CLS token and the mean of the
    patch tokens, both after the encoder's final norm."""
    def featurise(imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = encoder.forward_features(imgs)  # [B, 1+N, D]
        return {"cls": tokens[:, 0], "avg": tokens[:, 1:].mean(1)}  # [B, D] each
    return featurise


def pixel_readout(imgs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The raw-pixel baseline: the flattened, normalised images {"pixels": [B, C*H*W]}."""
    return {"pixels": imgs.flatten(1)}  # [B, C*H*W]


@torch.no_grad()
def extract_features(featurise: Featuriser, loader: Iterable, device: torch.device,
                     progress: bool = True, desc: str = "features", amp: str = "auto"
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every readout's features ({name: [N, D]}, float32) and the labels [N] of a whole dataset,
    on `device`; the encoder runs under `amp` (`pemae.engine.runtime.autocast`: fp32 on the CPU)."""
    feats: dict[str, list[torch.Tensor]] = {}
    labels = []
    for imgs, y in tqdm(loader, disable=not progress, desc=desc):
        with autocast(device, amp):
            readouts = featurise(imgs.to(device))  # {name: [B, D]}
        for name, x in readouts.items():
            feats.setdefault(name, []).append(x.float())  # [B, D]
        labels.append(y.to(device))  # [B]
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


@torch.no_grad()
def split_features(featurise: Featuriser, dataset: Dataset, cfg: Config, device: torch.device,
                   procs: distributed.Processes, progress: bool = True, desc: str = "features",
                   everywhere: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`extract_features` of a whole split (under `pretrain.amp`), whatever the processes: each
    extracts its run of whole batches, and every process (`everywhere`), or the main process
    alone (the others get no rows), gets every readout's features [N, D] and the labels [N], in
    dataset order, on `device`."""
    batch, amp = cfg.evaluation.batch_size, cfg.pretrain.amp
    shard = distributed.dataset_shard(dataset, batch, procs)
    if len(shard) == 0:  # more processes than batches: learn the readouts' widths from one image
        feats, labels = extract_features(featurise, DataLoader(Subset(dataset, [0])), device, False,
                                         amp=amp)
        feats, labels = {k: v[:0] for k, v in feats.items()}, labels[:0]  # [0, D] each, [0]
    else:
        loader = eval_batches(shard, batch, cfg.data.num_workers)
        feats, labels = extract_features(featurise, loader, device, progress and procs.is_main,
                                         desc, amp)
    gather = distributed.gather_rows if everywhere else distributed.gather_rows_to_main
    return ({k: gather(v, procs) for k, v in feats.items()},  # [N, D] each
            gather(labels, procs))  # [N]


def knn_chunk(num_train: int, chunk: int = 1024, budget: int = KNN_BUDGET_BYTES) -> int:
    """Test rows scored at a time against a bank of `num_train` rows: `chunk`, fewer where their
    float32 similarities [rows, num_train] would pass `budget` bytes (at least one row)."""
    return max(1, min(chunk, budget // (4 * max(num_train, 1))))


@torch.no_grad()
def knn_correct(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                test_y: torch.Tensor, k: int, temperature: float, chunk: int,
                num_classes: int) -> int:
    """How many of `test_x` the weighted k-NN classifies right (chunks of `chunk` rows), on the
    features' device."""
    train_x = F.normalize(train_x, dim=1)  # [Ntr, D]
    correct = 0
    for start in range(0, len(test_x), chunk):
        x = F.normalize(test_x[start:start + chunk], dim=1)  # [b, D]
        sim, idx = (x @ train_x.T).topk(k, dim=1)  # [b, k] each
        weights = (sim / temperature).exp()  # [b, k]
        votes = weights.new_zeros(len(x), num_classes)  # [b, C]
        votes.scatter_add_(1, train_y[idx], weights)  # [b, C]
        correct += (votes.argmax(1) == test_y[start:start + chunk]).sum().item()
    return correct


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024, procs: distributed.Processes = distributed.Processes()) -> float:
    """Weighted k-NN on cosine similarity (Wu et al. 2018; DINO's protocol): top-1 accuracy in %.
    `test_x` is scored `knn_chunk(len(train_x), chunk)` rows at a time (bounded memory).

    With `procs` distributed (every process holding every feature), each process votes for its
    run of whole chunks of `test_x` (the chunks one process forms) and the counts are summed: the
    same accuracy, less work each."""
    chunk = knn_chunk(len(train_x), chunk)
    rows = distributed.batch_shard(len(test_x), chunk, procs)
    mine = slice(rows.start, rows.stop)
    correct = knn_correct(train_x, train_y, test_x[mine], test_y[mine], min(k, len(train_x)),
                          temperature, chunk, int(train_y.max()) + 1)
    (correct,) = distributed.sum_over_processes([correct], procs)
    return 100.0 * correct / len(test_x)


def lars(module: nn.Module, weight_decay: float) -> torch.optim.Optimizer:
    """timm's LARS as MAE's linear probe uses it: matrices get the trust ratio (even without
    weight decay) and the decay; biases a plain momentum step, no decay (MAE's LARS skips
    parameters with ndim <= 1). The lr is set every step (`set_lr`)."""
    matrices = [p for p in module.parameters() if p.ndim > 1]
    vectors = [p for p in module.parameters() if p.ndim <= 1]
    return Lars([{"params": matrices, "weight_decay": weight_decay, "always_adapt": True},
                 {"params": vectors, "weight_decay": 0.0, "always_adapt": False}],
                lr=0.0, momentum=LARS_MOMENTUM, trust_coeff=LARS_TRUST_COEFF)


def probe_optimizer(probe: nn.Module, cfg: EvalConfig) -> torch.optim.Optimizer:
    """`evaluation.linear_optimizer`: AdamW (pemae's default) or LARS (MAE's)."""
    if cfg.linear_optimizer == "lars":
        return lars(probe, cfg.linear_weight_decay)
    return torch.optim.AdamW(probe.parameters(), lr=cfg.linear_lr, weight_decay=cfg.linear_weight_decay)


def probe_peak_lr(cfg: EvalConfig, batch: int) -> float:
    """`linear_base_lr * batch / 256` (the linear scaling rule of pretraining and MAE, on the
    batch actually used) when `linear_base_lr` > 0, else `linear_lr` as it stands. (Not
    `pemae.engine.batching.peak_lr`: the evaluation stages do not depend on the pretraining code.)"""
    return cfg.linear_base_lr * batch / 256 if cfg.linear_base_lr > 0 else cfg.linear_lr


def fit_on_cached(probe: nn.Module, opt: torch.optim.Optimizer, num_items: int, batch: int,
                  epochs: int, generator: torch.Generator, lr_at: Callable[[int], float],
                  loss_of: Callable[[torch.Tensor], torch.Tensor], progress: bool = False,
                  desc: str = "probe epochs") -> nn.Module:
    """Train a probe on cached features: each epoch a fresh order of the `num_items` items
    (`generator`, drawn where it lives), full batches only, the lr of each step from
    `lr_at(step)`, and `loss_of(idx)` the loss of the items `idx` [batch] (on the probe's
    device). Returns the probe in eval mode."""
    step = 0
    device = next(probe.parameters()).device  # where the loss reads its items
    probe.train()
    for _ in tqdm(range(epochs), disable=not progress, desc=desc):
        # drawn where the generator lives (the CPU: the same order whatever the probe's device)
        order = torch.randperm(num_items, generator=generator, device=generator.device)  # [N]
        order = order.to(device)  # [N], N = num_items
        for i in range(num_items // batch):
            idx = order[i * batch:(i + 1) * batch]  # [batch]
            set_lr(opt, lr_at(step))
            loss = loss_of(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return probe.eval()


def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, cfg: EvalConfig,
                       progress: bool = False) -> nn.Module:
    """MAE's linear probe on frozen features: BatchNorm without affine, then a linear layer,
    trained with AdamW or LARS (`linear_optimizer`), linear warm-up and a cosine schedule, on
    the cached features (no augmentation), on their device. The probe is initialised on the CPU
    (the same initial weights whatever the device), then moved."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    num_classes = int(train_y.max()) + 1
    cpu = torch.device("cpu")
    probe = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False, device=cpu),
                          nn.Linear(train_x.shape[1], num_classes, device=cpu))
    nn.init.trunc_normal_(probe[1].weight, std=0.01)
    nn.init.zeros_(probe[1].bias)
    probe.to(train_x.device)
    opt = probe_optimizer(probe, cfg)
    batch = min(cfg.linear_batch_size, len(train_x))
    steps_per_epoch = len(train_x) // batch
    total = cfg.linear_epochs * steps_per_epoch
    lr = probe_peak_lr(cfg, batch)
    warmup = min(total, round(cfg.linear_warmup_epochs * steps_per_epoch))
    return fit_on_cached(probe, opt, len(train_x), batch, cfg.linear_epochs, gen,
                         lambda step: warmup_cosine(step, total, lr, 0.0, warmup),
                         lambda idx: F.cross_entropy(probe(train_x[idx]), train_y[idx]),
                         progress, "linear probe epochs")


@torch.no_grad()
def probe_accuracy(probe: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy (%) of a trained probe."""
    return 100.0 * (probe(x).argmax(1) == y).float().mean().item()


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, cfg: EvalConfig, progress: bool = False) -> float:
    """Top-1 test accuracy (%) of a linear probe trained on (train_x, train_y)."""
    return probe_accuracy(train_linear_probe(train_x, train_y, cfg, progress), test_x, test_y)


def readout_scores(features: dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]],
                   ec: EvalConfig, progress: bool = False) -> dict:
    """k-NN and linear-probe top-1 (%, 2 decimals) of every readout, fitted on "train" and scored
    on the other splits of `features` ({split: ({readout: [N, D]}, labels [N])}), in one process:
    {split: {readout: {"knn_top1", "linear_top1"}}}."""
    train_feats, train_y = features["train"]
    scored = [split for split in features if split != "train"]
    scores: dict = {split: {} for split in scored}
    for readout, train_x in train_feats.items():
        probe = train_linear_probe(train_x, train_y, ec, progress)
        for split in scored:
            x, y = features[split][0][readout], features[split][1]
            knn = knn_accuracy(train_x, train_y, x, y, ec.knn_k, ec.knn_temperature)
            scores[split][readout] = {"knn_top1": round(knn, 2),
                                      "linear_top1": round(probe_accuracy(probe, x, y), 2)}
    return scores


def share_scores(scores: dict | None, splits: Iterable[str], readouts: Iterable[str],
                 procs: distributed.Processes) -> dict:
    """The main process's `readout_scores` on every process (the others pass None): one
    broadcast of their floats, bit for bit. One process: `scores` itself."""
    if not procs.distributed:
        return scores
    keys = [(split, readout, name) for split in splits for readout in readouts for name in SCORES]
    values = [scores[s][r][n] for s, r, n in keys] if procs.is_main else [0.0] * len(keys)
    shared: dict = {}
    for (split, readout, name), value in zip(keys, distributed.broadcast_from_main(values, procs)):
        shared.setdefault(split, {}).setdefault(readout, {})[name] = value
    return shared


def evaluate_features(cfg: Config, featurise: Featuriser, device: torch.device,
                      progress: bool = True,
                      procs: distributed.Processes = distributed.Processes()) -> dict:
    """k-NN and linear-probe top-1 (%) of every readout of `featurise`, fitted on the training
    split, scored on val (when data.val_fraction > 0) and test:
    {"val": {readout: {"knn_top1", "linear_top1"}}, "test": {...}}; the same on every process
    (the processes share the extraction; the main process alone scores, on `device`)."""
    ec = cfg.evaluation
    seed_everything(ec.seed)
    splits = ("train", "val", "test") if cfg.data.val_fraction > 0 else ("train", "test")
    features = {}
    for split in splits:
        dataset = build_dataset(cfg.data, split, eval_transform(cfg.data))
        features[split] = split_features(featurise, dataset, cfg, device, procs, progress,
                                         f"{split} features", everywhere=False)
    scores = readout_scores(features, ec, progress) if procs.is_main else None
    return share_scores(scores, splits[1:], features["train"][0], procs)


def evaluate_encoder(cfg: Config, encoder_path: str | Path, progress: bool = True) -> dict:
    """`evaluate_features` on the CLS and average-patch readouts of an exported encoder; one
    process, or every process of a `torchrun` launch (the same scores on each)."""
    procs, device = distributed.start(cfg.pretrain.device)
    try:
        encoder = checkpoint.load_encoder(encoder_path).eval().to(device)
        return evaluate_features(cfg, encoder_readouts(encoder), device, progress, procs)
    finally:
        distributed.stop(procs)


def evaluate_pixels(cfg: Config, progress: bool = True) -> dict:
    """`evaluate_features` on the raw pixels: the baseline every encoder is read against (on the
    CPU; under `torchrun`, its processes share the extraction over gloo)."""
    procs, device = distributed.start("cpu")
    try:
        return evaluate_features(cfg, pixel_readout, device, progress, procs)
    finally:
        distributed.stop(procs)
