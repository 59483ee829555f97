"""Full fine-tuning of a pretrained encoder (MAE's protocol, scaled down).

AdamW with layer-wise lr decay, drop path, label smoothing, warm-up + cosine lr per step,
global average pooling with a fresh norm (or the CLS token). Trained on the training split; the
validation split is scored after every epoch (what the epoch count and the other knobs are chosen
on), the test split once, at the end. The randomly initialised encoder fine-tuned with the same
budget is the from-scratch baseline. MAE's augmentation and mixing (RandAugment, random erasing,
mixup, cutmix: timm's own implementations) are knobs, off by default (the `paper` preset sets them).

One process by default; under `torchrun` one DDP process per device (`python -m pemae.cli
finetune`):

- `finetune.batch_size` is the global batch. Each epoch's order is drawn as one process always
  drew it (torch's RandomSampler on a generator seeded by `finetune.seed`); every process draws the
  same order and takes its contiguous 1/world of each batch (`pemae.engine.sampling.ShardedBatches`), and
  DDP averages the gradients: the update of the global batch.
- The randomness inside a step (crops and flips in the loading process, drop path, mixup and
  cutmix, random erasing) comes from each process's own RNGs: rank 0's are seeded by
  `finetune.seed` exactly as one process's (one process is the run it always was), rank r's by
  (seed, r) once the model is built (every rank starts from the same weights); DataLoader workers
  mix the rank into their seeds (`RankSeededWorkers`). So two processes with B/2 images each
  equal one process with B to float rounding when that randomness is off (`data.hflip: false`,
  `finetune.crop_min_scale: 1`, `finetune.drop_path: 0`, no mixing or erasing; tested); with it
  on, they are alike in distribution, not equal.
- Validation and test accuracy: each process scores a contiguous run of whole batches of the split
  and the counts are summed, so the whole split is scored once, as one process scores it.
- Rank 0 alone writes files and shows progress.

Files written into `out_dir` (rank 0): log.csv (one row per epoch: step, epoch, the last step's
loss averaged over processes, val_top1), summary.json; with `finetune.checkpoint_every: N > 0`,
also last.pt every N steps while the run is unfinished (model, optimiser, every process's RNG
states, the shuffling generator as the epoch began, step; the one before kept as last.prev.pt)
and checkpoint.pt at the end (the same state: `state["model"]` is the fine-tuned timm
classifier). Rerunning the same command resumes from last.pt (or last.prev.pt when last.pt is
unreadable): an epoch resumed mid-way redraws its order and skips the batches already trained
without loading them; with `data.num_workers: 0` the final weights and metrics equal an
uninterrupted run's (tested; DataLoader workers are reseeded when a resumed epoch starts, so with
workers the augmentation after a resume differs). Another config is refused, naming the keys. A
finished run is not resumed: rerunning it trains again, as always. `checkpoint_every: 0` (the
default) writes no checkpoint files.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from pemae.config.schema import Config, ConfigError, FinetuneConfig
from pemae.data.datasets import build_dataset, eval_batches, fixed_subset, num_classes
from pemae.data.transforms import eval_transform, finetune_train_transform
from pemae.engine import checkpoint, distributed
from pemae.engine.batching import accumulation_steps, peak_lr
from pemae.engine.optim import adamw, layer_decay_param_groups, set_lr
from pemae.engine.runtime import (MetricLog, autocast, grad_scaler, rng_state, seed_everything,
                                  set_rng_state)
from pemae.engine.sampling import RankSeededWorkers, ShardedBatches, mixed_seed
from pemae.engine.schedules import warmup_cosine, warmup_step_count
from pemae.engine.state import (interrupted_state, load_training_state, optimizer_update,
                                refuse_other_config, training_state)
from pemae.models.encoder import build_encoder


# What a resumed run compares with its checkpoint, and the keys that may change on resume (where
# and how fast it runs, not what it computes)
FINETUNE_SECTIONS = ("data", "model", "finetune")
FINETUNE_RESUMABLE_KEYS = ("data.root", "data.download", "data.num_workers", "data.skip_bad",
                           "finetune.checkpoint_every", "finetune.micro_batch_size")
LAST, PREVIOUS, FINAL = "last.pt", "last.prev.pt", "checkpoint.pt"


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
        raise ConfigError(f"{encoder_path}: encoder does not match the config ({exc})") from exc
    if unexpected or set(missing) != {"head.weight", "head.bias"}:
        raise ConfigError(f"{encoder_path}: encoder does not match the config "
                         f"(missing {missing}, unexpected {unexpected})")
    nn.init.trunc_normal_(vit.head.weight, std=2e-5)  # MAE's head init
    nn.init.zeros_(vit.head.bias)
    return vit


@torch.no_grad()
def correct_count(model: nn.Module, loader: Iterable, device: torch.device,
                  amp: str = "auto") -> tuple[int, int]:
    """(images classified right, images) over `loader`."""
    model.eval()
    correct = total = 0
    for imgs, y in loader:
        with autocast(device, amp):
            logits = model(imgs.to(device, non_blocking=True))  # [B, classes]
        correct += (logits.argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct, total


def accuracy(model: nn.Module, loader: Iterable, device: torch.device) -> float:
    """Top-1 accuracy in %."""
    correct, total = correct_count(model, loader, device)
    return 100.0 * correct / total


def split_accuracy(model: nn.Module, dataset: Dataset, cfg: Config, device: torch.device,
                   procs: distributed.Processes) -> float:
    """Top-1 accuracy (%) on a whole split: each process counts its run of whole batches
    (`pemae.engine.distributed.batch_shard`), the counts are summed; the same on every process."""
    shard = distributed.dataset_shard(dataset, cfg.evaluation.batch_size, procs)
    loader = eval_batches(shard, cfg.evaluation.batch_size, cfg.data.num_workers)
    counts = distributed.sum_over_processes(list(correct_count(model, loader, device, cfg.pretrain.amp)),
                                            procs)
    correct, total = counts
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


# --------------------------------------------------------------------------------------------
# The training data, split over processes
# --------------------------------------------------------------------------------------------
def training_set(cfg: Config) -> Dataset:
    """The labelled training images (`finetune.train_subset` of the train split), augmented."""
    fc = cfg.finetune
    train = build_dataset(cfg.data, "train", finetune_train_transform(cfg.data, fc))
    train = fixed_subset(train, fc.train_subset, "finetune.train_subset")
    if len(train) < fc.batch_size:
        raise ConfigError(f"finetune.batch_size = {fc.batch_size} exceeds the {len(train)} training images")
    return train


def process_batch_size(fc: FinetuneConfig, world_size: int) -> int:
    """Images per process per step: the global `finetune.batch_size` split evenly (and each part
    even when mixup/cutmix pair the images)."""
    part, rest = divmod(fc.batch_size, world_size)
    if rest:
        raise ConfigError(f"finetune.batch_size = {fc.batch_size} does not split into {world_size} "
                          "processes' equal parts")
    if fc.mixes and part % 2:
        raise ConfigError(f"finetune.batch_size = {fc.batch_size}: mixup/cutmix need an even batch "
                          f"on each of the {world_size} processes ({part} each)")
    return part


def training_loader(train: Dataset, cfg: Config, generator: torch.Generator,
                    procs: distributed.Processes, device: torch.device) -> DataLoader:
    """The shuffled loader of one process (torch's RandomSampler on `generator`, full batches
    only, the base seed of its workers drawn from `generator` too: exactly
    `DataLoader(shuffle=True, drop_last=True)`), each process taking its part of every batch."""
    fc = cfg.finetune
    batches = BatchSampler(RandomSampler(train, generator=generator), fc.batch_size, drop_last=True)
    return DataLoader(train, batch_sampler=ShardedBatches(batches, procs.world_size, procs.rank),
                      num_workers=cfg.data.num_workers, generator=generator,
                      worker_init_fn=RankSeededWorkers(procs.rank) if procs.distributed else None,
                      pin_memory=device.type == "cuda", persistent_workers=cfg.data.num_workers > 0)


def seed_process(seed: int, rank: int) -> None:
    """Give rank r > 0 its own RNG streams, seeded by (seed, r), for the draws inside a step
    (crops, flips, drop path, mixing); rank 0 keeps `seed`'s, as one process."""
    if rank > 0:
        seed_everything(mixed_seed(seed, rank))


# --------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------
def classifier_step(net: nn.Module, optimizer: torch.optim.Optimizer, imgs: torch.Tensor,
                    y: torch.Tensor, mixup: Mixup | None, label_smoothing: float,
                    device: torch.device, amp: str = "auto", accum_steps: int = 1,
                    scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Forward, backward (DDP all-reduces the gradients when `net` is wrapped) and update on this
    process's part of a batch, in `accum_steps` equal micro-batches whose gradients add up to the
    part's (mixup/cutmix draw once, on the whole part); returns the loss, detached."""
    imgs, y = imgs.to(device, non_blocking=True), y.to(device, non_blocking=True)  # [b, C, H, W], [b]
    if mixup is not None:
        imgs, y = mixup(imgs, y)  # [b, C, H, W] mixed, [b, classes] soft targets
    optimizer.zero_grad(set_to_none=True)
    no_sync = getattr(net, "no_sync", None)
    total = torch.zeros((), device=device)  # [] the part's mean loss
    for a, (x, t) in enumerate(zip(imgs.chunk(accum_steps), y.chunk(accum_steps))):
        last = a == accum_steps - 1
        with no_sync() if (no_sync is not None and not last) else nullcontext():
            with autocast(device, amp):
                logits = net(x)  # [m, classes]
            loss = classification_loss(logits.float(), t, label_smoothing)
            if accum_steps > 1:
                loss = loss / accum_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    optimizer_update(optimizer, scaler)
    return total


# --------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------
def checkpoint_due(fc: FinetuneConfig, step: int, total_steps: int) -> bool:
    """Whether last.pt is written after `step`: every `checkpoint_every` steps, not at the end."""
    return bool(fc.checkpoint_every) and step % fc.checkpoint_every == 0 and step < total_steps


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config,
                    step: int, steps_per_epoch: int, loader_state: torch.Tensor, seconds: float,
                    procs: distributed.Processes) -> None:
    """Every process's RNG states gathered, the replicas checked, then rank 0 writes `path`
    atomically (last.pt keeps its predecessor as last.prev.pt). Called on every process.
    `loader_state` is the shuffling generator as the current epoch began (or as the next one
    begins, at an epoch's end)."""
    rng = distributed.gather_objects(rng_state(), procs)
    distributed.check_replicas_agree(model)
    if procs.is_main:
        state = training_state(model, optimizer, cfg, step, steps_per_epoch, seconds,
                               restore={"rng": rng, "loader_generator": loader_state})
        checkpoint.save_atomic(state, path, path.with_name(PREVIOUS) if path.name == LAST else None)


def restore_rng(states: list[dict], seed: int, step: int, procs: distributed.Processes) -> None:
    """This process's saved RNG states; after a change in the number of processes (the batches
    are the same), fresh streams seeded by (seed, rank, step), with a warning."""
    if len(states) == procs.world_size:
        set_rng_state(states[procs.rank])
        return
    if procs.is_main:
        print(f"WARNING: the checkpoint holds {len(states)} process(es)' RNG states, this run has "
              f"{procs.world_size}: the batches continue as they were, the augmentation and drop "
              "path draws do not")
    seed_everything(mixed_seed(seed, procs.rank, step))


def resume_finetuning(out_dir: Path, cfg: Config, steps_per_epoch: int, model: nn.Module,
                      optimizer: torch.optim.Optimizer, generator: torch.Generator,
                      batches: ShardedBatches, procs: distributed.Processes) -> tuple[int, float]:
    """Continue an interrupted run of `out_dir` (last.pt, else last.prev.pt): load the model,
    optimiser, RNG states and shuffling generator, and start the epoch at the step it reached.
    Returns (step, seconds trained so far); (0, 0.0) when there is nothing to resume."""
    found = interrupted_state([out_dir / LAST, out_dir / PREVIOUS])
    if found is None:
        return 0, 0.0
    path, state = found
    refuse_other_config(state, cfg, f"{path} is an interrupted fine-tuning run",
                        f"Set those keys back to resume it, or delete {path} to start afresh.",
                        FINETUNE_SECTIONS, FINETUNE_RESUMABLE_KEYS)
    load_training_state(path, state, steps_per_epoch, model, optimizer)
    restore_rng(state["rng"], cfg.finetune.seed, state["step"], procs)
    generator.set_state(state["loader_generator"])
    batches.resume_at(state["step"] % steps_per_epoch)
    if procs.is_main:
        print(f"resuming fine-tuning at step {state['step']} from {path}")
    return state["step"], state["seconds"]


def finish_checkpoints(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       cfg: Config, step: int, steps_per_epoch: int, generator: torch.Generator,
                       seconds: float, procs: distributed.Processes) -> None:
    """At the end of a run with `checkpoint_every` > 0: its state as checkpoint.pt, and last.pt
    and last.prev.pt removed (nothing is left to resume). Called on every process."""
    save_checkpoint(out_dir / FINAL, model, optimizer, cfg, step, steps_per_epoch,
                    generator.get_state(), seconds, procs)
    if procs.is_main:
        (out_dir / LAST).unlink(missing_ok=True)
        (out_dir / PREVIOUS).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def finetune(cfg: Config, encoder_path: str | Path, out_dir: str | Path,
             progress: bool = True, test: bool = True) -> dict:
    """Fine-tune the whole encoder on labelled data; write log.csv and summary.json (and the
    checkpoints of `finetune.checkpoint_every`; see the module docstring).

    One process, or every process of a `torchrun` launch (the summary on each). An interrupted
    run in `out_dir` is resumed. `test=False` (a search on the validation split) leaves the test
    split unread.
    """
    procs, device = distributed.start(cfg.pretrain.device)
    try:
        return _finetune(cfg, encoder_path, Path(out_dir), progress, test, procs, device)
    finally:
        distributed.stop(procs)


def _finetune(cfg: Config, encoder_path: str | Path, out_dir: Path, progress: bool, test: bool,
              procs: distributed.Processes, device: torch.device) -> dict:
    fc, main = cfg.finetune, procs.is_main
    generator = seed_everything(fc.seed)

    train = training_set(cfg)
    part = process_batch_size(fc, procs.world_size)
    train_loader = training_loader(train, cfg, generator, procs, device)
    accum = accumulation_steps(fc.batch_size, fc.micro_batch_size, procs.world_size, "finetune")
    scored = (("val",) if cfg.data.val_fraction > 0 else ()) + (("test",) if test else ())
    eval_sets = {split: build_dataset(cfg.data, split, eval_transform(cfg.data)) for split in scored}

    classes = num_classes(train)
    model = classifier_from_encoder(encoder_path, cfg, classes).to(device)
    mixup = build_mixup(fc, classes)
    optimizer = adamw(layer_decay_param_groups(model, fc.weight_decay, fc.layer_decay), device,
                      lr=0.0, betas=tuple(fc.betas))
    scaler = grad_scaler(device, cfg.pretrain.amp)
    steps_per_epoch = len(train) // fc.batch_size
    total_steps = fc.epochs * steps_per_epoch
    lr = peak_lr(fc.batch_size, fc.base_lr)
    warmup_steps = warmup_step_count(fc.warmup_epochs, steps_per_epoch, total_steps)
    seed_process(fc.seed, procs.rank)  # after the model: the same initial weights everywhere
    start_step, seconds_before = resume_finetuning(out_dir, cfg, steps_per_epoch, model, optimizer,
                                                   generator, train_loader.batch_sampler, procs)
    net = distributed.wrap(model, procs, device)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if main and (procs.distributed or start_step or accum > 1):
        print(f"fine-tuning: {len(train)} images, {fc.epochs} epochs x {steps_per_epoch} steps; "
              f"{procs.world_size} process(es) x {part // accum} images x {accum} accumulation "
              f"step(s) = batch {fc.batch_size}; base lr "
              f"{fc.base_lr:g} -> lr {lr:g}; device {device.type}")
    log = MetricLog(out_dir / "log.csv", keep_until=start_step or None) if main else None

    step, start, row = start_step, time.perf_counter(), {}
    for epoch in range(start_step // steps_per_epoch, fc.epochs):
        epoch_start = generator.get_state()  # before the epoch's draws: what a resume redraws
        net.train()
        for imgs, y in tqdm(train_loader, disable=not (progress and main),
                            desc=f"finetune epoch {epoch + 1}"):
            set_lr(optimizer, warmup_cosine(step, total_steps, lr, fc.min_lr, warmup_steps))
            loss = classifier_step(net, optimizer, imgs, y, mixup, fc.label_smoothing, device,
                                   cfg.pretrain.amp, accum, scaler)
            step += 1
            if checkpoint_due(fc, step, total_steps) and step % steps_per_epoch:  # mid-epoch
                save_checkpoint(out_dir / LAST, model, optimizer, cfg, step, steps_per_epoch,
                                epoch_start, seconds_before + time.perf_counter() - start, procs)
        row = ({"val_top1": split_accuracy(model, eval_sets["val"], cfg, device, procs)}
               if "val" in eval_sets else {})
        epoch_loss = distributed.mean_over_processes({"loss": loss})["loss"]
        if main:
            log.append(step=step, epoch=epoch + 1, loss=epoch_loss, **row)
        if checkpoint_due(fc, step, total_steps):  # at the epoch's end: the next epoch starts whole
            save_checkpoint(out_dir / LAST, model, optimizer, cfg, step, steps_per_epoch,
                            generator.get_state(), seconds_before + time.perf_counter() - start, procs)
    if main:
        log.close()
    seconds = seconds_before + time.perf_counter() - start
    scores = {"val_top1": row["val_top1"]} if row else {}
    if "test" in eval_sets:  # read once, at the end
        scores["test_top1"] = split_accuracy(model, eval_sets["test"], cfg, device, procs)
    summary = {**{k: round(v, 2) for k, v in scores.items()},
               "epochs": fc.epochs, "labelled_images": len(train), "seconds": round(seconds, 1),
               "protocol": protocol(cfg)}
    if procs.distributed:  # (one process's summary keeps the keys it always had)
        summary["world_size"] = procs.world_size
    if main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if fc.checkpoint_every:
        finish_checkpoints(out_dir, model, optimizer, cfg, step, steps_per_epoch, generator,
                           seconds, procs)
    return summary
