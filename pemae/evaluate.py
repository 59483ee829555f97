"""Frozen-feature evaluations of a pretrained encoder: k-NN (DINO) and a linear probe (MAE)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pemae import checkpoint
from pemae.config import Config, EvalConfig
from pemae.data import build_dataset, eval_transform
from pemae.optim import set_lr
from pemae.runtime import pick_device, seed_everything
from pemae.schedules import warmup_cosine


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: DataLoader, device: torch.device,
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS-token features (after the final norm) and labels of a whole dataset."""
    encoder.eval().to(device)
    feats, labels = [], []
    for imgs, y in tqdm(loader, disable=not progress, desc="features"):
        tokens = encoder.forward_features(imgs.to(device))  # [B, 1+N, D]
        feats.append(tokens[:, 0].float().cpu())  # [B, D]
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)  # [N, D], [N]


@torch.no_grad()
def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> float:
    """Weighted k-NN on cosine similarity (Wu et al. 2018; DINO's protocol): top-1 accuracy in %."""
    num_classes = int(train_y.max()) + 1
    k = min(k, len(train_x))
    train_x = F.normalize(train_x, dim=1)  # [Ntr, D]
    correct = 0
    for start in range(0, len(test_x), chunk):
        x = F.normalize(test_x[start:start + chunk], dim=1)  # [b, D]
        sim, idx = (x @ train_x.T).topk(k, dim=1)  # [b, k] each
        weights = (sim / temperature).exp()  # [b, k]
        votes = torch.zeros(len(x), num_classes)  # [b, C]
        votes.scatter_add_(1, train_y[idx], weights)  # [b, C]
        correct += (votes.argmax(1) == test_y[start:start + chunk]).sum().item()
    return 100.0 * correct / len(test_x)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, cfg: EvalConfig, progress: bool = False) -> float:
    """MAE's linear probe on frozen features: BatchNorm without affine, then a linear layer.

    Trained with AdamW and a cosine schedule on the cached features (no augmentation).
    Returns top-1 test accuracy in %.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    num_classes = int(train_y.max()) + 1
    probe = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False),
                          nn.Linear(train_x.shape[1], num_classes))
    nn.init.trunc_normal_(probe[1].weight, std=0.01)
    nn.init.zeros_(probe[1].bias)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.linear_lr, weight_decay=cfg.linear_weight_decay)
    batch = min(cfg.linear_batch_size, len(train_x))
    steps_per_epoch = len(train_x) // batch
    total = cfg.linear_epochs * steps_per_epoch
    step = 0
    probe.train()
    for _ in tqdm(range(cfg.linear_epochs), disable=not progress, desc="linear probe epochs"):
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            set_lr(opt, warmup_cosine(step, total, cfg.linear_lr, 0.0, 0))
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    probe.eval()
    with torch.no_grad():
        pred = probe(test_x).argmax(1)  # [Nte]
    return 100.0 * (pred == test_y).float().mean().item()


def evaluate_encoder(cfg: Config, encoder_path: str | Path, progress: bool = True) -> dict:
    """k-NN and linear-probe top-1 (%) of an exported encoder on the config's dataset."""
    ec = cfg.evaluation
    seed_everything(ec.seed)
    device = pick_device(cfg.pretrain.device)
    encoder = checkpoint.load_encoder(encoder_path)
    features = {}
    for split in ("train", "test"):
        dataset = build_dataset(cfg.data, split, eval_transform(cfg.data))
        loader = DataLoader(dataset, batch_size=ec.batch_size, num_workers=cfg.data.num_workers)
        features[split] = extract_features(encoder, loader, device, progress)
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    return {
        "knn_top1": round(knn_accuracy(train_x, train_y, test_x, test_y, ec.knn_k, ec.knn_temperature), 2),
        "linear_top1": round(linear_probe_accuracy(train_x, train_y, test_x, test_y, ec, progress), 2),
    }
