"""Full fine-tuning of a pretrained encoder (MAE's protocol, scaled down).

AdamW with layer-wise lr decay, drop path, label smoothing, warm-up + cosine lr per step,
global average pooling with a fresh norm (or the CLS token). Trained on the training split; the
validation split is scored after every epoch (what the epoch count and the other knobs are chosen
on), the test split once, at the end. The randomly initialised encoder fine-tuned with the same
budget is the from-scratch baseline. MAE's augmentation and mixing (RandAugment, random erasing,
mixup, cutmix: timm's own implementations) are knobs, off by default (the `paper` preset sets them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pemae import checkpoint
from pemae.config import Config, ConfigError, FinetuneConfig
from pemae.data import (build_dataset, eval_transform, finetune_train_transform, fixed_subset,
                        num_classes)
from pemae.encoder import build_encoder
from pemae.optim import layer_decay_param_groups, set_lr
from pemae.pretrain import peak_lr
from pemae.runtime import MetricLog, autocast, pick_device, seed_everything
from pemae.schedules import warmup_cosine, warmup_step_count


def classifier_from_encoder(encoder_path: str | Path, cfg: Config, classes: int) -> nn.Module:
    """A timm ViT classifier initialised from an exported encoder."""
    fc = cfg.finetune
    vit = build_encoder(cfg.model, cfg.data, num_classes=classes, global_pool=fc.global_pool,
                        drop_path=fc.drop_path)
    state = checkpoint.load(encoder_path)["state_dict"]
    if fc.global_pool == "avg":  # timm pools then normalises with fc_norm; start it from norm
        state = {("fc_norm." + k[5:] if k.startswith("norm.") else k): v for k, v in state.items()}
    try:
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise ValueError(f"{encoder_path}: encoder does not match the config ({exc})") from exc
    if unexpected or set(missing) != {"head.weight", "head.bias"}:
        raise ValueError(f"{encoder_path}: encoder does not match the config "
                         f"(missing {missing}, unexpected {unexpected})")
    nn.init.trunc_normal_(vit.head.weight, std=2e-5)  # MAE's head init
    nn.init.zeros_(vit.head.bias)
    return vit


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy in %."""
    model.eval()
    correct = total = 0
    for imgs, y in loader:
        with autocast(device):
            logits = model(imgs.to(device))  # [B, classes]
        correct += (logits.argmax(1).cpu() == y).sum().item()
        total += len(y)
    return 100.0 * correct / total


def build_mixup(fc: FinetuneConfig, classes: int) -> Mixup | None:
    """timm's Mixup as MAE sets it (per batch, label smoothing folded into the soft targets);
    None when mixup and cutmix are both off (the hard-label path)."""
    if not fc.mixes:
        return None
    return Mixup(mixup_alpha=fc.mixup, cutmix_alpha=fc.cutmix, prob=fc.mixup_prob,
                 switch_prob=fc.mixup_switch_prob, mode="batch",
                 label_smoothing=fc.label_smoothing, num_classes=classes)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor,
                        label_smoothing: float) -> torch.Tensor:
    """Cross-entropy of logits [B, classes] against hard labels [B] (with label smoothing) or
    against the soft targets [B, classes] of mixup/cutmix (timm's SoftTargetCrossEntropy)."""
    if targets.ndim == 2:
        return SoftTargetCrossEntropy()(logits, targets)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def protocol(cfg: Config) -> str:
    """What the fine-tuning run is: an encoder with no pretraining is trained from scratch."""
    kind = "from scratch" if cfg.pretrain.epochs == 0 else "fine-tuned"
    return f"{kind} (layer decay {cfg.finetune.layer_decay:g})"


def finetune(cfg: Config, encoder_path: str | Path, out_dir: str | Path,
             progress: bool = True, test: bool = True) -> dict:
    """Fine-tune the whole encoder on labelled data; write log.csv and summary.json.

    `test=False` (a search on the validation split) leaves the test split unread.
    """
    fc = cfg.finetune
    out_dir = Path(out_dir)
    device = pick_device(cfg.pretrain.device)
    generator = seed_everything(fc.seed)

    train = build_dataset(cfg.data, "train", finetune_train_transform(cfg.data, fc))
    train = fixed_subset(train, fc.train_subset, "finetune.train_subset")
    if len(train) < fc.batch_size:
        raise ConfigError(f"finetune.batch_size = {fc.batch_size} exceeds the {len(train)} training images")
    train_loader = DataLoader(train, batch_size=fc.batch_size, shuffle=True, drop_last=True,
                              num_workers=cfg.data.num_workers, generator=generator)
    scored = (("val",) if cfg.data.val_fraction > 0 else ()) + (("test",) if test else ())
    loaders = {split: DataLoader(build_dataset(cfg.data, split, eval_transform(cfg.data)),
                                 batch_size=cfg.evaluation.batch_size, num_workers=cfg.data.num_workers)
               for split in scored}

    classes = num_classes(train)
    model = classifier_from_encoder(encoder_path, cfg, classes).to(device)
    mixup = build_mixup(fc, classes)
    optimizer = torch.optim.AdamW(layer_decay_param_groups(model, fc.weight_decay, fc.layer_decay),
                                  lr=0.0, betas=tuple(fc.betas))
    steps_per_epoch = len(train_loader)
    total_steps = fc.epochs * steps_per_epoch
    lr = peak_lr(fc.batch_size, fc.base_lr)
    warmup_steps = warmup_step_count(fc.warmup_epochs, steps_per_epoch, total_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = MetricLog(out_dir / "log.csv")
    step, start, row = 0, time.perf_counter(), {}
    for epoch in range(fc.epochs):
        model.train()
        for imgs, y in tqdm(train_loader, disable=not progress, desc=f"finetune epoch {epoch + 1}"):
            set_lr(optimizer, warmup_cosine(step, total_steps, lr, fc.min_lr, warmup_steps))
            imgs, y = imgs.to(device), y.to(device)  # [B, C, H, W], [B]
            if mixup is not None:
                imgs, y = mixup(imgs, y)  # [B, C, H, W] mixed, [B, classes] soft targets
            with autocast(device):
                logits = model(imgs)  # [B, classes]
            loss = classification_loss(logits.float(), y, fc.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        row = {"val_top1": accuracy(model, loaders["val"], device)} if "val" in loaders else {}
        log.append(step=step, epoch=epoch + 1, loss=loss.item(), **row)
    log.close()
    seconds = time.perf_counter() - start
    scores = {"val_top1": row["val_top1"]} if row else {}
    if "test" in loaders:
        scores["test_top1"] = accuracy(model, loaders["test"], device)  # read once, at the end
    summary = {**{k: round(v, 2) for k, v in scores.items()},
               "epochs": fc.epochs, "labelled_images": len(train), "seconds": round(seconds, 1),
               "protocol": protocol(cfg)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
