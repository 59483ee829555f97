"""GPU check of the training engine, and the compute estimate of a full pretraining run.

For MAE, PEMAE single and PEMAE dual (`pemae.perf.step_cost.COST_VARIANTS`), `gpu_check` times the real
training step (`pemae.engine.pretrain.train_step`: forward, backward, AdamW, the teachers' EMA update)
on one GPU and reports images/s, the peak GPU memory and the MFU (model FLOPs utilisation):
the FLOPs of one training step, counted once on the CPU with `torch.utils.flop_counter`, times
the measured images/s, over the GPU's dense bf16 peak. The command (paper preset: ViT-B/16 at
224 px, batch 64, bf16; about a minute on one H100):

    python -m pemae.gpu_check

`python -m pemae.gpu_check --smoke` runs the real loops end to end instead (`pemae.perf.smoke`).
It needs a CUDA GPU for the paper preset (on a CPU it refuses); `--preset tiny --device cpu
--amp off` runs the same code on the CPU in seconds. `python -m pemae.gpu_check --estimate`
prints the FLOPs and GPU-hours of the preset's full run (800 epochs of ImageNet-1K) at an
*assumed* MFU instead (no GPU needed).
"""

from __future__ import annotations

import gc
import re

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from pemae.config.params import build_config
from pemae.config.schema import Config
from pemae.engine.batching import peak_lr
from pemae.engine.optim import param_groups
from pemae.engine.pretrain import train_step
from pemae.models.pemae import stand_in_view2
from pemae.perf.step_cost import (COST_VARIANTS, build_variant, first_measured_step, format_table,
                                  resolve_device, timed_steps)


IMAGENET_TRAIN_IMAGES = 1_281_167
GIB = 2**30

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets (H100/H200/B200:
# SXM parts unless the name says PCIe/NVL; sparse figures are twice these). Keys are matched as
# whole words of `torch.cuda.get_device_name()`, longest first ("A10" is not "A100" or "A10G").
PEAK_BF16_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "H200 NVL": 835.0,
    "H200": 989.0,
    "GH200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "A30": 165.0,
    "L40S": 362.0,
    "L40": 181.0,
    "A10": 125.0,
    "L4": 121.0,
}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a GPU by its name (None when unknown)."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", device_name, flags=re.IGNORECASE):
            return PEAK_BF16_TFLOPS[key]
    return None


# --------------------------------------------------------------------------------------------
# FLOP counting
# --------------------------------------------------------------------------------------------
def _cpu_sdpa_flop(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward_flop(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU's fused attention kernel (torch counts only the
    CUDA ones): without it the attention matmuls of timm's blocks would be missed on the CPU."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flop
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _optimizer(model: nn.Module, cfg: Config, batch: int) -> torch.optim.Optimizer:
    """AdamW over `param_groups`, as `pemae.perf.step_cost` and `pemae.engine.pretrain` build it."""
    pc = cfg.pretrain
    return torch.optim.AdamW(param_groups(model, pc.weight_decay), lr=peak_lr(batch, pc.base_lr),
                             betas=tuple(pc.betas))


def _images(cfg: Config, batch: int, seed: int = 0) -> torch.Tensor:
    d = cfg.data
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d.in_chans, d.img_size, d.img_size, generator=gen)  # [B, C, H, W]


def flops_per_image(cfg: Config, method_overrides: dict, batch: int = 2,
                    variant: str | None = None) -> dict:
    """FLOPs per image of one training step and of one forward of a variant, counted on the CPU.

    The training step is `train_step` at a steady-state step (`first_measured_step`): student
    forward and backward, teacher forwards, AdamW, EMA. The forward is `model(imgs, step)` under
    `torch.no_grad()` in train mode (teachers included). Counted by `FlopCounterMode`: matmuls,
    convolutions and attention only (elementwise ops, norms, softmax, the optimiser and the EMA
    are not counted), i.e. the usual "model FLOPs" of MFU. A multiply-add counts as 2 FLOPs.
    """
    model = build_variant(cfg, method_overrides).train()
    optimizer = _optimizer(model, cfg, batch)
    imgs = _images(cfg, batch)  # [B, C, H, W]
    view2 = stand_in_view2(model, imgs)  # [B, C, H, W] or None
    step = first_measured_step(model)
    with flop_counter() as train:
        train_step(model, optimizer, imgs, torch.device("cpu"), step, amp="off", view2=view2)
    with torch.no_grad(), flop_counter() as forward:
        model(imgs, step + 1, view2=view2)
    return {"variant": variant or method_overrides.get("name", "?"),
            "train_flops_per_image": train.get_total_flops() / batch,
            "forward_flops_per_image": forward.get_total_flops() / batch}


def preset_config(preset: str | Config) -> Config:
    """The preset's config; no data is read, so an image folder's root need not exist."""
    if isinstance(preset, Config):
        return preset
    return build_config(preset, {"data": {"root": "unused: gpu_check reads no images"}})


# --------------------------------------------------------------------------------------------
# The GPU check
# --------------------------------------------------------------------------------------------
def _shown(rows: list[dict], hide: tuple[str, ...] = ()) -> str:
    """The rows as a markdown table without the `hide` columns, missing values as n/a."""
    return format_table([{k: ("n/a" if v is None else v) for k, v in r.items() if k not in hide}
                         for r in rows])


def gpu_check(preset: str | Config = "paper", variants: dict[str, dict] = COST_VARIANTS,
              batch_size: int = 64, warmup: int = 3, steps: int = 10, device=None,
              amp: str = "bf16", peak: float | None = None, verbose: bool = True) -> list[dict]:
    """Images/s, peak memory and MFU of the training step of each variant, one after another.

    Each variant is built from the same seed, moved to `device` (None: the config's, `auto` =
    CUDA when there is one), warmed up for `warmup` steps, then timed over `steps` consecutive
    steps on one fixed random batch. Peak memory is `torch.cuda.max_memory_allocated` since the
    model arrived on the GPU (weights, AdamW state, activations), in GiB; None on the CPU.
    MFU = train FLOPs per image x images/s / (peak x 1e12), `peak` in TFLOP/s (None: looked up
    from the GPU's name; the MFU is None when unknown). Returns one dict per variant.
    """
    cfg = preset_config(preset)
    device = resolve_device(device, cfg)
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    peak = peak if peak is not None else (peak_tflops(name) if on_gpu else None)
    imgs = _images(cfg, batch_size).to(device)  # [B, C, H, W]

    rows = []
    for variant, overrides in variants.items():
        flops = flops_per_image(cfg, overrides, variant=variant)  # on the CPU, before the GPU run
        model = build_variant(cfg, overrides).to(device).train()
        optimizer = _optimizer(model, cfg, batch_size)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        step = first_measured_step(model)
        if warmup:
            timed_steps(model, optimizer, imgs, device, step, warmup, amp)
        seconds = timed_steps(model, optimizer, imgs, device, step + warmup, steps, amp)
        memory = torch.cuda.max_memory_allocated(device) / GIB if on_gpu else None
        rate = batch_size / seconds
        achieved = flops["train_flops_per_image"] * rate / 1e12
        rows.append({
            "variant": variant, "device": name, "amp": amp, "batch_size": batch_size,
            "steps": steps, "step_ms": 1e3 * seconds, "images_per_s": rate,
            "peak_memory_gib": memory,
            "train_flops_per_image": flops["train_flops_per_image"],
            "forward_flops_per_image": flops["forward_flops_per_image"],
            "train_gflops_per_image": flops["train_flops_per_image"] / 1e9,
            "achieved_tflops": achieved, "peak_tflops": peak,
            "mfu": achieved / peak if peak else None,
        })
        del model, optimizer
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    if verbose:
        print(_shown(rows, hide=("train_flops_per_image", "forward_flops_per_image")))
        if peak is None:
            print(f"MFU n/a: no known bf16 peak for {name!r} (pass peak= / --peak-tflops)")
    return rows


# --------------------------------------------------------------------------------------------
# The compute estimate
# --------------------------------------------------------------------------------------------
def compute_estimate(preset: str | Config = "paper", images_per_epoch: int = IMAGENET_TRAIN_IMAGES,
                     epochs: int | None = None, peak_tflops: float = 989.0,
                     mfu: float | dict[str, float] = 0.4, mfu_measured: bool = False,
                     variants: dict[str, dict] = COST_VARIANTS, verbose: bool = True) -> list[dict]:
    """Total training FLOPs and GPU-hours of a full pretraining run, per variant.

    total FLOPs = train FLOPs per image x images_per_epoch x epochs (None: the preset's);
    GPU-hours = total / (peak_tflops x 1e12 x mfu) / 3600. The MFU is an ASSUMPTION (0.4 by
    default) unless `mfu_measured` says it was measured (e.g. `gpu_check`'s, as a float or a
    {variant: mfu} dict). FLOPs are model FLOPs (see `flops_per_image`).
    """
    cfg = preset_config(preset)
    epochs = cfg.pretrain.epochs if epochs is None else epochs
    rows = []
    for variant, overrides in variants.items():
        f = flops_per_image(cfg, overrides, variant=variant)["train_flops_per_image"]
        u = mfu[variant] if isinstance(mfu, dict) else mfu
        total = f * images_per_epoch * epochs
        rows.append({
            "variant": variant, "train_gflops_per_image": f / 1e9, "train_flops_per_image": f,
            "images_per_epoch": images_per_epoch, "epochs": epochs, "total_flops": total,
            "total_eflops": total / 1e18, "peak_tflops": peak_tflops, "mfu": u,
            "mfu_source": "measured" if mfu_measured else "assumed",
            "images_per_s_per_gpu": peak_tflops * 1e12 * u / f,
            "gpu_hours": total / (peak_tflops * 1e12 * u) / 3600,
        })
    if verbose:
        print(_shown(rows, hide=("train_flops_per_image", "total_flops")))
        source = ("measured" if mfu_measured else
                  "an ASSUMPTION, not a measurement (measure it with `python -m pemae.gpu_check` "
                  "on the GPU, then pass --mfu X --mfu-measured)")
        print(f"GPU-hours at {peak_tflops:g} dense bf16 TFLOP/s per GPU and MFU "
              f"{mfu if isinstance(mfu, dict) else f'{mfu:g}'}: the MFU is {source}. FLOPs are "
              "model FLOPs (matmul/conv/attention only, FlopCounterMode).")
    return rows
