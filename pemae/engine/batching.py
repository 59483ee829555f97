"""Batch arithmetic shared by the two training loops: the peak learning rate scaled to the batch
(lr = base_lr x batch / 256), the batch a data set allows, and the micro-batches of gradient
accumulation that keep the global batch when one process cannot hold it."""

from __future__ import annotations

import dataclasses

from pemae.config.schema import Config, ConfigError


def peak_lr(batch_size: int, base_lr: float) -> float:
    """The linear scaling rule of Goyal et al. (2017), as in MAE: lr = base_lr * batch / 256."""
    return base_lr * batch_size / 256


def batch_for_data(cfg: Config, num_images: int, world_size: int = 1) -> Config:
    """`cfg` with the batch halved until an epoch of `num_images` has `min_steps_per_epoch` steps.

    A small data set at a large batch gives a handful of steps per epoch: 1.3k images at batch
    256 are 5 steps, and 40 epochs of them left an MAE encoder worse than a random one, while the
    same epochs at batch 64 (20 steps an epoch) beat it on every probe (results/search/
    small_data.jsonl). The lr follows the batch (lr = base_lr * batch / 256); the batch stays
    a multiple of world size x accum_steps and at least 16 images a step.
    """
    pc = cfg.pretrain
    batch, parts = pc.batch_size, world_size * pc.accum_steps
    while (num_images // batch < pc.min_steps_per_epoch and batch // 2 >= max(16, parts)
           and (batch // 2) % parts == 0):
        batch //= 2
    if batch == pc.batch_size:
        return cfg
    print(f"pretrain.batch_size {pc.batch_size} -> {batch}: {num_images} images would give "
          f"{num_images // pc.batch_size} steps per epoch (pretrain.min_steps_per_epoch = "
          f"{pc.min_steps_per_epoch})")
    return dataclasses.replace(cfg, pretrain=dataclasses.replace(pc, batch_size=batch))


def micro_batch_size(batch_size: int, accum_steps: int, world_size: int) -> int:
    """Images per process per forward pass; the global batch must split evenly."""
    parts = accum_steps * world_size
    if batch_size % parts:
        raise ConfigError(f"pretrain.batch_size = {batch_size} does not split into {world_size} "
                          f"process(es) x pretrain.accum_steps = {accum_steps} equal micro-batches")
    return batch_size // parts


def accumulation_steps(batch_size: int, micro_batch: int, world_size: int, section: str) -> int:
    """Micro-batches per step so that no process takes more than `micro_batch` images at once:
    ceil(batch / (world x micro)); the batch must then split evenly (a ConfigError names the keys).
    `micro_batch` 0: one micro-batch (the batch split over the processes)."""
    if not micro_batch:
        return 1
    accum = max(1, -(-batch_size // (world_size * micro_batch)))
    if batch_size % (world_size * accum):
        raise ConfigError(f"{section}.batch_size = {batch_size} does not split into {world_size} "
                          f"process(es) x {accum} equal micro-batches of at most "
                          f"{section}.micro_batch_size = {micro_batch} images")
    return accum


def with_accumulation(cfg: Config, world_size: int) -> Config:
    """`cfg` with `pretrain.accum_steps` derived from `pretrain.micro_batch_size` (when set) for
    this number of processes: the same global batch, and so the same recipe, on 1 or 8 GPUs."""
    pc = cfg.pretrain
    if not pc.micro_batch_size:
        return cfg
    accum = accumulation_steps(pc.batch_size, pc.micro_batch_size, world_size, "pretrain")
    return dataclasses.replace(cfg, pretrain=dataclasses.replace(pc, accum_steps=accum))
