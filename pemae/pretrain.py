"""Self-supervised pretraining: one loop for every method, one process, CPU or CUDA."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pemae import checkpoint
from pemae.config import Config, ConfigError, build_config
from pemae.data import build_dataset, pretrain_transform
from pemae.model import build_pretrain_model, collapse_report
from pemae.optim import param_groups, set_lr
from pemae.runtime import MetricLog, autocast, pick_device, seed_everything
from pemae.schedules import warmup_cosine


def peak_lr(batch_size: int, base_lr: float) -> float:
    """The linear scaling rule of Goyal et al. (2017), as in MAE: lr = base_lr * batch / 256."""
    return base_lr * batch_size / 256


def pretrain(cfg: Config, out_dir: str | Path, progress: bool = True) -> tuple[nn.Module, dict]:
    """Pretrain `cfg.method`; write into `out_dir` checkpoint.pt, encoder.pt (the encoder alone,
    for timm), config.yaml (the resolved config), log.csv (per-step metrics) and summary.json.

    Returns the trained model and the summary.
    """
    out_dir = Path(out_dir)
    pc = cfg.pretrain
    device = pick_device(pc.device)
    generator = seed_everything(pc.seed)

    dataset = build_dataset(cfg.data, "train", pretrain_transform(cfg.data))
    if len(dataset) < pc.batch_size:
        raise ConfigError(
            f"pretrain.batch_size = {pc.batch_size} exceeds the {len(dataset)} training images"
        )
    loader = DataLoader(dataset, batch_size=pc.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers, generator=generator,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.data.num_workers > 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.yaml")

    steps_per_epoch = len(loader)
    total_steps = pc.epochs * steps_per_epoch
    model = build_pretrain_model(cfg, total_steps, steps_per_epoch).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, pc.weight_decay), lr=0.0, betas=tuple(pc.betas))
    lr = peak_lr(pc.batch_size, pc.base_lr)
    warmup_steps = round(pc.warmup_epochs * steps_per_epoch)
    print(f"pretraining {cfg.method.name}: {len(dataset)} images, {pc.epochs} epochs x "
          f"{steps_per_epoch} steps, batch {pc.batch_size}, base lr {pc.base_lr:g} -> lr {lr:g}, "
          f"device {device.type}")

    log = MetricLog(out_dir / "log.csv")
    step, seen, start = 0, 0, time.perf_counter()
    bar = tqdm(total=total_steps, disable=not progress, desc=f"pretrain {cfg.method.name}")
    model.train()
    for epoch in range(pc.epochs):
        for imgs, _ in loader:
            set_lr(optimizer, warmup_cosine(step, total_steps, lr, pc.min_lr, warmup_steps))
            terms = train_step(model, optimizer, imgs.to(device, non_blocking=True), device, step)
            step += 1
            seen += imgs.shape[0]
            bar.update()
            if step % pc.log_every == 0 or step == total_steps:
                terms = {k: v.item() for k, v in terms.items()}  # the only host sync
                rate = seen / (time.perf_counter() - start)
                log.append(step=step, epoch=step / steps_per_epoch,
                           lr=optimizer.param_groups[0]["lr"], images_per_s=rate, **terms)
                bar.set_postfix(loss=f"{terms['loss']:.4f}", img_s=f"{rate:.0f}")
    bar.close()
    log.close()
    elapsed = time.perf_counter() - start

    checkpoint.save_atomic(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
         "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "config": cfg.to_dict()},
        out_dir / "checkpoint.pt",
    )
    checkpoint.export_encoder(model.encoder, cfg, out_dir / "encoder.pt")
    summary = {"steps": step, "images_seen": seen, "seconds": round(elapsed, 1),
               "images_per_s": round(seen / elapsed, 1) if step else 0.0,
               "final_loss": terms["loss"] if step else None,
               **(collapse_report(terms, cfg.method.num_prototypes) if step else {})}
    if summary.get("collapsed"):
        print(f"WARNING: the pseudo labels of this run collapsed: {summary}")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return model, summary


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, imgs: torch.Tensor,
               device: torch.device, step: int) -> dict[str, torch.Tensor]:
    """Forward, backward, update (student), then the model's own update (teachers).

    Returns every scalar the model reported (loss terms and monitors), detached.
    """
    with autocast(device):
        out = model(imgs, step)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    model.after_backward(step)
    optimizer.step()
    model.after_step(step)
    return {k: v.detach() for k, v in out.items() if v.ndim == 0}


def load_pretrained(path: str | Path) -> tuple[nn.Module, Config]:
    """Rebuild a pretraining model (student, heads, teachers) from its checkpoint, in eval mode."""
    state = checkpoint.load(path)
    cfg = build_config("default", state["config"])
    # the schedule lengths only shape training: absent, any value rebuilds the same modules
    model = build_pretrain_model(cfg, state.get("total_steps", state["step"]),
                                 state.get("steps_per_epoch", 1))
    model.load_state_dict(state["model"])
    return model.eval(), cfg
