"""What the teachers cost: training-step throughput and memory of MAE, PEMAE single, PEMAE dual.

The paper calls the second (decoupled) teacher's cost "negligible". `measure_step_cost` measures
it in one process, on one fixed batch, with the same training step as `pemae.engine.pretrain` (forward,
backward, AdamW step, the teachers' EMA update):

    from pemae.config.params import build_config
    from pemae.perf.step_cost import measure_step_cost
    rows = measure_step_cost(build_config("default"), warmup=2, steps=6)   # prints a table

or `python -m pemae.cost --preset default --warmup 2 --steps 6`.

Fairness: every variant is built from the same seed (identical student initialisation), is
warmed up before any timing, and the timed steps are interleaved in rounds whose variant order
rotates, so slow drifts or bursts of noise on a shared machine hit every variant alike; each
variant's step time is the median over its rounds.

The measuring helpers take any implementation as a `Contender` (a model, its optimiser and a
zero-argument `run_step`), so `pemae.perf.benchmark` times the Hugging Face and lightly peers with the
same warm-up, memory accounting and interleaved rounds as pemae's own variants.
"""

from __future__ import annotations

import gc
import itertools
import math
import statistics
import time

import torch
from torch import nn

from pemae.config.params import build_config, deep_merge
from pemae.config.schema import Config, PretrainConfig
from pemae.engine.batching import peak_lr
from pemae.engine.optim import param_groups
from pemae.engine.pretrain import train_step
from pemae.engine.runtime import keep_freed_memory, pick_device
from pemae.models.pemae import build_pretrain_model, stand_in_view2
from pemae.perf.memory import Contender, StepFn, measure_memory
from pemae.report.tables import markdown_table


COST_VARIANTS: dict[str, dict] = {
    "mae": {"name": "mae"},
    "pemae_single": {"name": "pemae", "teachers": "single"},
    "pemae_dual": {"name": "pemae", "teachers": "dual"},
}

REFERENCE = "mae"  # ratios `*_vs_mae` are relative to this variant
SINGLE = "pemae_single"  # ratios `*_vs_single` (dual over single) are relative to this one
TOTAL_STEPS, STEPS_PER_EPOCH = 1000, 100  # the schedule the measured models are built for


# --------------------------------------------------------------------------------------------
# Building one variant
# --------------------------------------------------------------------------------------------
def variant_config(cfg: Config, method_overrides: dict) -> Config:
    """`cfg` with `method_overrides` merged into its `method` section, validated again."""
    return build_config("default", deep_merge(cfg.to_dict(), {"method": method_overrides}))


def build_variant(cfg: Config, method_overrides: dict, seed: int = 0) -> nn.Module:
    """The pretraining model of one variant, initialised from `seed` (on the CPU).

    The RNG is reset right before building, and the student MAE is the first module every
    variant builds, so all variants start from the same student weights.
    """
    torch.manual_seed(seed)
    return build_pretrain_model(variant_config(cfg, method_overrides), TOTAL_STEPS, STEPS_PER_EPOCH)


def student_of(model: nn.Module) -> nn.Module:
    """The student masked autoencoder (PEMAE wraps one; MAE is one)."""
    return getattr(model, "student", model)


def teacher_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of the model's EMA teachers (none for MAE)."""
    teachers = getattr(model, "teacher_set", None)
    return list(teachers.parameters()) if teachers is not None else []


def first_measured_step(model: nn.Module) -> int:
    """A steady-state step index: half-way through training and past prototype freezing.

    During the first epoch(s) PEMAE drops the prototypes' gradient (so AdamW keeps no state for
    them); measuring there would under-count the student's cost.
    """
    return max(TOTAL_STEPS // 2, getattr(model, "freeze_last_layer_steps", 0))


def fixed_batch(cfg: Config, batch: int, seed: int = 0) -> torch.Tensor:
    """Random images [batch, in_chans, img_size, img_size] (on the CPU), the same for a seed."""
    d = cfg.data
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d.in_chans, d.img_size, d.img_size, generator=gen)  # [B, C, H, W]


def adamw(model: nn.Module, pc: PretrainConfig, batch: int) -> torch.optim.AdamW:
    """AdamW over `param_groups` with the pretraining lr (scaled to `batch`), betas and decay."""
    return torch.optim.AdamW(param_groups(model, pc.weight_decay),
                             lr=peak_lr(batch, pc.base_lr), betas=tuple(pc.betas))


def pemae_steps(model: nn.Module, optimizer: torch.optim.Optimizer, imgs: torch.Tensor,
                device: torch.device, first_step: int, amp: str = "auto") -> StepFn:
    """pemae's `train_step` on `imgs`, at step first_step, first_step + 1, ... call after call,
    without the collapse monitors (the training loop computes them on logged steps only)."""
    steps = itertools.count(first_step)
    view2 = stand_in_view2(model, imgs)  # [B, C, H, W] or None
    return lambda: train_step(model, optimizer, imgs, device, next(steps), amp, view2=view2,
                              monitor=False)


def pemae_contender(cfg: Config, method_overrides: dict, imgs: torch.Tensor, device: torch.device,
                    seed: int = 0, amp: str = "auto") -> Contender:
    """One pemae variant on `device`: seeded model, AdamW, steps from `first_measured_step`."""
    model = build_variant(cfg, method_overrides, seed).to(device).train()
    optimizer = adamw(model, cfg.pretrain, len(imgs))
    return Contender(model, optimizer,
                     pemae_steps(model, optimizer, imgs, device, first_measured_step(model), amp))


def warm_up(contender: Contender, count: int) -> None:
    """`count` untimed steps (lazy allocations, AdamW state, allocator and kernel caches)."""
    for _ in range(count):
        contender.run_step()


def step_memory(model: nn.Module, optimizer: torch.optim.Optimizer, imgs: torch.Tensor,
                device: torch.device, step: int) -> dict:
    """`measure_memory` of pemae's `train_step` at steps `step` (and `step + 1` on CUDA)."""
    return measure_memory(Contender(model, optimizer, pemae_steps(model, optimizer, imgs, device, step)),
                          device)


# --------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------
def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(run_step: StepFn, device: torch.device, count: int) -> float:
    """Seconds per step over `count` consecutive calls of `run_step` (synchronised at both ends only)."""
    sync_device(device)
    start = time.perf_counter()
    for _ in range(count):
        run_step()
    sync_device(device)
    return (time.perf_counter() - start) / count


def timed_steps(model: nn.Module, optimizer: torch.optim.Optimizer, imgs: torch.Tensor,
                device: torch.device, first_step: int, count: int, amp: str = "auto") -> float:
    """Seconds per step over `count` consecutive pemae training steps from `first_step`."""
    return time_steps(pemae_steps(model, optimizer, imgs, device, first_step, amp), device, count)


def rotated(names: list[str], shift: int) -> list[str]:
    """`names` rotated left by `shift` (round r starts with a different variant)."""
    shift %= len(names)
    return names[shift:] + names[:shift]


def interleaved_rounds(run_steps: dict[str, StepFn], rounds: int, block: int,
                       device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of every implementation in every round: {name: [one time per round]}.

    Each round times `block` consecutive steps of every implementation, in an order that rotates
    from round to round, so slow drifts and bursts of noise hit every implementation alike.
    """
    gc.collect()
    samples: dict[str, list[float]] = {name: [] for name in run_steps}
    for r in range(rounds):
        for name in rotated(list(run_steps), r):
            samples[name].append(time_steps(run_steps[name], device, block))
    return samples


def timing_columns(times: list[float], batch: int) -> dict:
    """step_ms (median over rounds), its min and max, and images_per_s at the median."""
    median = statistics.median(times)
    return {"step_ms": 1e3 * median, "step_ms_min": 1e3 * min(times),
            "step_ms_max": 1e3 * max(times), "images_per_s": batch / median}


# --------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------
def add_ratios(rows: list[dict], reference: str, suffix: str) -> None:
    """Add throughput_vs_<suffix> and memory_vs_<suffix> to every row (skipped if absent)."""
    ref = next((r for r in rows if r["variant"] == reference), None)
    if ref is None:
        return
    for r in rows:
        r[f"throughput_vs_{suffix}"] = r["images_per_s"] / ref["images_per_s"]
        r[f"memory_vs_{suffix}"] = r["peak_memory_mb"] / ref["peak_memory_mb"]


COLUMNS = ("variant", "batch_size", "step_ms", "step_ms_min", "step_ms_max", "images_per_s",
           "throughput_vs_mae", "throughput_vs_single", "peak_memory_mb", "memory_vs_mae",
           "memory_vs_single", "memory_kind", "state_mb", "saved_mb", "params_trainable",
           "params_teacher", "device")


def resolve_device(device: str | torch.device | None, cfg: Config) -> torch.device:
    """A torch device as given, or `pick_device` of a name (None: cfg.pretrain.device)."""
    if isinstance(device, torch.device):
        return device
    return pick_device(device or cfg.pretrain.device)


def measure_step_cost(cfg: Config, variants: dict[str, dict] = COST_VARIANTS,
                      batch_size: int | None = None, warmup: int = 3, steps: int = 10,
                      device=None, seed: int = 0, block: int = 1,
                      verbose: bool = True) -> list[dict]:
    """Throughput and memory of one training step for each variant (method overrides of `cfg`).

    One fixed batch of random images [batch, in_chans, img_size, img_size] (batch defaults to
    cfg.pretrain.batch_size) feeds every step. Each variant gets its model (seeded: identical
    student initialisation), AdamW over `param_groups`, `warmup` untimed steps and one memory
    measurement (see `measure_memory`). Then `steps` timed steps per variant run in rounds: each
    round times `block` consecutive steps of every variant, the order rotating from round to
    round; the step time is the median over rounds. Steps use a steady-state step index
    (`first_measured_step`).

    Returns one flat dict per variant (keys: `COLUMNS`); `*_vs_mae` are ratios to the `mae`
    row, `*_vs_single` to the `pemae_single` row (the dual row's is dual over single).
    """
    keep_freed_memory()  # the allocator the training loop runs on (pemae.engine.distributed.start)
    device = resolve_device(device, cfg)
    batch = batch_size or cfg.pretrain.batch_size
    imgs = fixed_batch(cfg, batch, seed).to(device)  # [B, C, H, W]

    contenders: dict[str, Contender] = {}
    rows: dict[str, dict] = {}
    for name, overrides in variants.items():
        contenders[name] = pemae_contender(cfg, overrides, imgs, device, seed)
        warm_up(contenders[name], warmup)
        model = contenders[name].model
        rows[name] = {
            "variant": name, "batch_size": batch,
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "params_teacher": sum(p.numel() for p in teacher_parameters(model)),
            "device": device.type,
        }

    for name, contender in contenders.items():  # after every warm-up: lazy workspaces count for none
        rows[name].update(measure_memory(contender, device))

    samples = interleaved_rounds({name: c.run_step for name, c in contenders.items()},
                                 math.ceil(steps / block), block, device)
    for name, times in samples.items():
        rows[name].update(timing_columns(times, batch))
    out = list(rows.values())
    add_ratios(out, REFERENCE, "mae")
    add_ratios(out, SINGLE, "single")
    out = [{k: r[k] for k in COLUMNS if k in r} for r in out]
    if verbose:
        print(format_table(out))
        print(summary(out))
    return out


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """Rows as a markdown table; columns are the union of keys in order of first appearance."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return markdown_table(rows, columns, fmt=_cell)


def summary(rows: list[dict]) -> str:
    """The ratios that matter, one line each: every variant against MAE, dual against single."""
    pairs = [(r, "mae") for r in rows if r["variant"] != REFERENCE and "throughput_vs_mae" in r]
    pairs += [(r, "single") for r in rows
              if r["variant"] not in (REFERENCE, SINGLE) and "throughput_vs_single" in r]
    lines = []
    for r, ref in pairs:
        t, m = r[f"throughput_vs_{ref}"], r[f"memory_vs_{ref}"]
        lines.append(f"{r['variant']} vs {ref}: throughput x{t:.3f} ({100 * (t - 1):+.1f}%), "
                     f"peak memory x{m:.3f} ({100 * (m - 1):+.1f}%) [{r['memory_kind']}]")
    return "\n".join(lines)
