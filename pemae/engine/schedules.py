"""Schedules as pure functions of the global step (so resuming needs only the step)."""

from __future__ import annotations

import math


def ema_momentum(step: int, total_steps: int, base: float) -> float:
    """Cosine schedule from `base` at step 0 to 1 at step `total_steps` (BYOL / DINO)."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def teacher_temperature(step: int, total_steps: int, start: float, final: float,
                        warmup_fraction: float) -> float:
    """Linear warm-up of τ_t from `start` to `final` over the first fraction of the steps."""
    warmup = warmup_fraction * total_steps
    if step >= warmup:
        return final
    return start + (final - start) * step / warmup


def warmup_cosine(step: int, total_steps: int, peak: float, final: float, warmup_steps: int) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to `final`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_step_count(warmup_epochs: float, steps_per_epoch: int, total_steps: int,
                      min_fraction: float = 0.05) -> int:
    """Warm-up steps: `warmup_epochs` of steps, but never under `min_fraction` of the run.

    Warm-up given in epochs shrinks with the data set (0.3 epochs of 1.4k images at batch 256 is
    one step), and an AdamW start at full lr without warm-up wrecks a ViT; a floor of 5% of the
    steps keeps a sensible warm-up on any data set size. Never more than the whole run.
    """
    return min(total_steps, max(round(warmup_epochs * steps_per_epoch), round(min_fraction * total_steps)))
