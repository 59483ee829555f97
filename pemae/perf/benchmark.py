"""Peer benchmark: pemae's pretraining step against the libraries people would use instead.

    python -m pemae.bench                                   # sizes issue and default, on the CPU/GPU
    python -m pemae.bench --size tiny --rounds 1 --steps 1 --warmup 1 --out /tmp/bench_tiny
    python -m pemae.bench --size issue --device cuda --dtype bf16 --out results/bench
    python -m pemae.bench --size default --compile --out results/bench/compiled

The peers need the `bench` extra (`pip install -e '.[bench]'`: transformers, lightly); a peer
whose library is missing is skipped with a printed note and pemae's rows still run. Writes
`bench.md` and `bench.json` into `--out` (default results/bench) and prints the tables.

What is measured. One process, one fixed batch of random images, one config per size. Every
implementation runs its whole training step: forward, backward, AdamW step (pemae's
`param_groups`, lr = base_lr * batch / 256, the config's betas and weight decay) and, for the
ones with teachers, the EMA update. After `--warmup` untimed steps, one step is counted with
`FlopCounterMode` (matmuls, convolutions, attention; a multiply-add = 2 FLOPs) and one measures
memory (`pemae.perf.memory.measure_memory`: on the CPU state + saved-for-backward, on CUDA the
allocator's peak). Then `--rounds` rounds each time `--steps` consecutive steps of every
implementation, in an order that rotates from round to round (`pemae.perf.step_cost.interleaved_rounds`);
img/s is at the median step time over rounds. The achieved FLOP/s of each step is given as a
fraction of a 2048 x 2048 matmul's peak measured at the start on the same device, in the
step's dtype (fp32: the sgemm peak). `--dtype bf16` runs every implementation under
`torch.autocast(device_type=..., dtype=torch.bfloat16)`. `--compile` compiles every implementation
(`torch.compile` of its model's forward, in place) after the FLOPs and memory are measured in eager
mode; one step each compiles it (its seconds: `compile s`), then the rounds run compiled.

Implementations (rows):
  pemae_mae      pemae's MAE (`build_pretrain_model`, method mae), pemae's `train_step`
  hf_mae         transformers' `ViTMAEForPreTraining`, configured with pemae's sizes
  lightly_mae    MAE assembled from lightly's modules as in lightly's own example
                 (`MaskedVisionTransformerTIMM` around a timm `VisionTransformer`,
                 `MAEDecoderTIMM`, `random_token_mask` / `patchify` / `get_at_index`), MSE on
                 the masked patches
  pemae_single   pemae's PEMAE with one teacher (method pemae, teachers single)
  pemae_dual     pemae's PEMAE with two teachers (method pemae, teachers dual)
  lightly_pemae  "what you would write with lightly": the lightly MAE student with a linear
                 token head (decoder width -> encoder width), two EMA teachers (copies of the
                 student backbone updated with `update_momentum`, cosine momentum schedules from
                 the config's two m0), both run on the full image; a `DINOProjectionHead`
                 (the config's hidden / bottleneck dims and K prototypes) on the student and, as
                 an EMA copy, on the labelling teacher; `DINOLoss` on the CLS token,
                 `IBOTPatchLoss` on the masked tokens, and MSE between the predicted tokens and
                 the reconstruction teacher's LayerNorm-ed tokens at the masked positions.
Ratios: pemae_mae / hf_mae, pemae_mae / lightly_mae, pemae_dual / lightly_pemae and
pemae_dual / pemae_single, of img/s, peak memory and FLOPs per step.

Where the peers differ from pemae (FLOPs are counted, so a difference in work shows there):
  - every peer: pemae's steps run without the collapse monitors (an SVD for the targets'
    effective rank, pseudo-label entropies), as the training loop's unlogged steps do (it
    computes them every `pretrain.log_every` steps); the peers compute none.
  - hf_mae: separate q, k, v projections (timm fuses them; same FLOPs); its own masking and
    norm-pix loss (same definitions). layer_norm_eps is set to 1e-6 (timm's; HF's default is
    1e-12). Its fixed position embeddings are frozen parameters (pemae's decoder one is a buffer):
    the encoders have exactly the same parameters, the trainable counts are equal.
  - lightly_mae: the decoder predicts pixels at the masked positions only (pemae and HF at all
    N, as the MAE reference code); norm-pix targets with lightly's `normalize_mean_var` (the
    same formula as pemae). The backbone holds an unused mask token (embed_dim parameters that
    never get a gradient). `MAEDecoderTIMM` is deprecated in lightly 1.6 in favour of
    `MaskedVisionTransformerDecoderTIMM` plus one's own linears: the same computation.
  - lightly_pemae: `DINOLoss` drops same-view pairs, and PEMAE's CLS pseudo label is same-view
    (method.views 1): the view is passed twice ([t, t] against [s, s]), which gives exactly the
    same-view cross-entropy, gradient and centre at the cost of a 2 x 2 instead of a 1 x 1
    einsum over [B, K]. Token targets are the LayerNorm of the teacher's tokens after its final
    norm (lightly's `encode`), pemae's before it (same cost; equal while the final norm's
    affine is the identity). The iBOT loss weighs each image by 1 / M, i.e. the plain mean over
    masked tokens, as pemae (every image masks M patches). The prototypes are frozen per epoch
    (lightly) rather than per step (pemae): inactive at the measured steps either way. The EMA
    is `_foreach` mul + add over parameters (pemae: `_foreach_lerp_` over parameters and float
    buffers; a ViT has none); both backbones carry the unused mask token (2 x embed_dim more
    teacher parameters). The head is built twice and the teacher's loaded from the student's
    (lightly's weight-norm head cannot be deep-copied).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from pemae.config.params import build_config
from pemae.config.schema import Config
from pemae.engine.runtime import keep_freed_memory, pick_device
from pemae.perf.gpu import flop_counter
from pemae.perf.memory import Contender, StepFn, measure_memory
from pemae.perf.peers import MISSING, RATIOS, available, library_version
from pemae.perf.step_cost import (fixed_batch, format_table, interleaved_rounds, sync_device,
                                  teacher_parameters, timing_columns, warm_up)


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------
ISSUE = {  # the size of the performance report: CIFAR-like images, a ViT-Tiny-ish encoder
    "data": {"img_size": 32, "in_chans": 3},
    "model": {"patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3,
              "decoder_dim": 128, "decoder_depth": 2},
    "method": {"num_prototypes": 1024, "head_hidden_dim": 512, "head_bottleneck_dim": 128},
    "pretrain": {"batch_size": 128},
}
SIZES: dict[str, tuple[str, dict]] = {  # name -> (preset, overrides)
    "issue": ("default", ISSUE),
    "default": ("default", {}),
    "tiny": ("tiny", {}),
}
DTYPES = {"fp32": ("off", torch.float32), "bf16": ("bf16", torch.bfloat16)}  # -> (amp, dtype)
GEMM_SIZE = 2048


def size_config(size: str) -> Config:
    """The config of a named size."""
    preset, overrides = SIZES[size]
    return build_config(preset, overrides)


def describe(cfg: Config, batch: int) -> str:
    """One line with the shapes that matter."""
    d, m, h = cfg.data, cfg.model, cfg.method
    return (f"batch {batch}, {d.img_size}x{d.img_size}x{d.in_chans}, patch {m.patch_size}, "
            f"width {m.embed_dim}, depth {m.depth} (heads {m.num_heads}), decoder "
            f"{m.decoder_dim}x{m.decoder_depth} (heads {m.decoder_heads}), K {h.num_prototypes} "
            f"(head {h.head_hidden_dim} -> {h.head_bottleneck_dim})")


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
def gemm_peak_flops(device: torch.device, dtype: torch.dtype, n: int = GEMM_SIZE,
                    repeats: int = 3, trials: int = 3) -> float:
    """FLOP/s of an n x n matmul in `dtype` on `device`, best of `trials` (fp32: sgemm)."""
    a = torch.randn(n, n, device=device).to(dtype)  # [n, n]
    b = torch.randn(n, n, device=device).to(dtype)  # [n, n]
    c = torch.mm(a, b)  # [n, n], warm-up
    best = float("inf")
    for _ in range(trials):
        sync_device(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=c)
        sync_device(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best


def count_flops(run_step: StepFn) -> int:
    """FLOPs of one training step (runs it): matmuls, convolutions and attention."""
    with flop_counter() as counter:
        run_step()
    return counter.get_total_flops()


def params_of(model: nn.Module) -> dict:
    return {"params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "params_teacher": sum(p.numel() for p in teacher_parameters(model))}


def add_flop_rates(row: dict, gemm_peak: float) -> None:
    """Achieved GFLOP/s of the median step and its fraction of the measured gemm peak."""
    achieved = row["flops_per_step"] / (row["step_ms"] / 1e3)
    row.update(gflop_per_step=row["flops_per_step"] / 1e9, achieved_gflop_s=achieved / 1e9,
               peak_fraction=achieved / gemm_peak)


def ratio_rows(rows: list[dict]) -> list[dict]:
    """a / b of img/s, peak memory and FLOPs per step for each pair of `RATIOS` both present."""
    by_name = {r["implementation"]: r for r in rows}
    out = []
    for a, b in RATIOS:
        if a in by_name and b in by_name:
            ra, rb = by_name[a], by_name[b]
            out.append({"ratio": f"{a} / {b}",
                        "throughput": ra["images_per_s"] / rb["images_per_s"],
                        "memory": ra["peak_memory_mb"] / rb["peak_memory_mb"],
                        "flops": ra["flops_per_step"] / rb["flops_per_step"]})
    return out


def compile_contenders(contenders: dict[str, Contender], rows: dict[str, dict]) -> None:
    """`torch.compile` every implementation's model in place (its forward: pemae's and the peers'
    alike) and run one step each to compile it; the seconds it took go into `compile_s`."""
    for name, contender in contenders.items():
        contender.model.compile()
        start = time.perf_counter()
        contender.run_step()  # compiles the forward, then the backward graph
        rows[name]["compile_s"] = time.perf_counter() - start


def benchmark_size(size: str, device: torch.device, dtype: str, gemm_peak: float,
                   rounds: int, warmup: int, steps: int, seed: int = 0,
                   batch_size: int | None = None, verbose: bool = True,
                   compile: bool = False) -> dict:
    """Every available implementation at one size: rows, ratios and the skipped peers.

    `compile`: FLOPs and memory are measured in eager mode, then every model is compiled
    (`compile_contenders`) and the timed rounds run compiled."""
    cfg = size_config(size)
    amp = DTYPES[dtype][0]
    batch = batch_size or cfg.pretrain.batch_size
    imgs = fixed_batch(cfg, batch, seed).to(device)  # [B, C, H, W]
    implementations, skipped = available(verbose)

    contenders: dict[str, Contender] = {}
    rows: dict[str, dict] = {}
    for impl in implementations:
        contenders[impl.name] = impl.build(cfg, imgs, device, amp, seed)
        warm_up(contenders[impl.name], warmup)
        rows[impl.name] = {"implementation": impl.name, "library": library_version(impl.library),
                           "batch_size": batch, **params_of(contenders[impl.name].model)}
    for name, contender in contenders.items():  # after every warm-up
        rows[name]["flops_per_step"] = count_flops(contender.run_step)
        rows[name].update(measure_memory(contender, device))
    if compile:
        compile_contenders(contenders, rows)

    samples = interleaved_rounds({n: c.run_step for n, c in contenders.items()}, rounds, steps, device)
    for name, times in samples.items():
        rows[name].update(timing_columns(times, batch))
        add_flop_rates(rows[name], gemm_peak)
    out = list(rows.values())
    return {"size": size, "description": describe(cfg, batch), "batch_size": batch,
            "config": {k: v for k, v in cfg.to_dict().items() if k in ("data", "model", "method")},
            "rows": out, "ratios": ratio_rows(out), "skipped": skipped}


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def shown_row(row: dict) -> dict:
    """The markdown columns of one implementation's row (bench.json keeps every key)."""
    return {"implementation": row["implementation"], "library": row["library"],
            "img/s": row["images_per_s"], "step ms": row["step_ms"], "min ms": row["step_ms_min"],
            "max ms": row["step_ms_max"], "peak MB": row["peak_memory_mb"],
            "GFLOP/step": row["gflop_per_step"], "GFLOP/s": row["achieved_gflop_s"],
            "% of gemm peak": 100 * row["peak_fraction"],
            **({"compile s": row["compile_s"]} if "compile_s" in row else {})}


def size_markdown(result: dict, meta: dict) -> str:
    """One size: its shapes, the implementations' table, the ratios, the skipped peers."""
    rows = [shown_row(r) for r in result["rows"]]
    kind = result["rows"][0]["memory_kind"] if result["rows"] else "-"
    lines = [f"## size `{result['size']}`", "",
             f"{result['description']}; {meta['dtype']}{', compiled' if meta.get('compile') else ''} "
             f"on {meta['device']} "
             f"({meta['device_name']}, {meta['threads']} threads); memory: {kind}; "
             f"gemm peak ({GEMM_SIZE}x{GEMM_SIZE} {meta['dtype']} matmul): "
             f"{meta['gemm_peak_gflop_s']:.1f} GFLOP/s", "",
             format_table(rows)]
    if result["ratios"]:
        lines.append(format_table([{"a / b": r["ratio"], "img/s": r["throughput"],
                                    "peak MB": r["memory"], "FLOPs/step": r["flops"]}
                                   for r in result["ratios"]]))
    lines += [f"- {s['note']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def report_markdown(report: dict) -> str:
    meta = report["meta"]
    head = (f"# Peer benchmark of one pretraining step (`python -m pemae.bench`)\n\n"
            f"{meta['versions']}; rounds {meta['rounds']} x steps {meta['steps']} after "
            f"{meta['warmup']} warm-up steps; img/s at the median step time over rounds.\n")
    return "\n".join([head] + [size_markdown(s, meta) for s in report["sizes"]])


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(report_markdown(report))
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def run_benchmark(sizes: list[str], rounds: int = 3, warmup: int = 2, steps: int = 5,
                  device: str = "auto", dtype: str = "fp32", out: str | Path | None = None,
                  seed: int = 0, batch_size: int | None = None, verbose: bool = True,
                  compile: bool = False) -> dict:
    """Benchmark every size; print each size's tables as it finishes and write `out` if given."""
    keep_freed_memory()  # the allocator the training loop runs on (pemae.engine.distributed.start), for all
    dev = pick_device(device, "--device")
    gemm_peak = gemm_peak_flops(dev, DTYPES[dtype][1])
    versions = ", ".join(library_version(lib) for lib in
                         ("torch", "timm", "transformers", "lightly") if lib not in MISSING)
    meta = {"device": dev.type, "device_name": device_name(dev), "threads": torch.get_num_threads(),
            "dtype": dtype, "compile": compile, "rounds": rounds, "steps": steps, "warmup": warmup,
            "gemm_peak_gflop_s": gemm_peak / 1e9, "versions": versions}
    report = {"meta": meta, "sizes": []}
    for size in sizes:
        result = benchmark_size(size, dev, dtype, gemm_peak, rounds, warmup, steps, seed,
                                batch_size, verbose, compile)
        report["sizes"].append(result)
        if verbose:
            print(size_markdown(result, meta))
        if out is not None:
            write_report(report, Path(out))
    return report
