"""Schedules as pure functions of the global step (so resuming needs only the step)."""

import math


def warmup_cosine(step: int, total_steps: int, peak: float, final: float, warmup_steps: int) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to `final`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(1.0, progress)))
