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
memory (`pemae.cost.measure_memory`: on the CPU state + saved-for-backward, on CUDA the
allocator's peak). Then `--rounds` rounds each time `--steps` consecutive steps of every
implementation, in an order that rotates from round to round (`pemae.cost.interleaved_rounds`);
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

import argparse
import copy
import importlib.metadata
import itertools
import json
import platform
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pemae.config import Config, build_config
from pemae.cost import (COST_VARIANTS, STEPS_PER_EPOCH, TOTAL_STEPS, Contender, StepFn, adamw,
                        fixed_batch, format_table, interleaved_rounds, measure_memory,
                        pemae_contender, sync_device, teacher_parameters, timing_columns,
                        warm_up)
from pemae.encoder import encoder_kwargs
from pemae.gpu_check import flop_counter
from pemae.runtime import autocast, keep_freed_memory, pick_device

MISSING: dict[str, str] = {}  # peer library -> why it cannot be imported (its rows are skipped)
try:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
except ImportError as err:
    MISSING["transformers"] = str(err)
try:
    from lightly.loss import DINOLoss, IBOTPatchLoss
    from lightly.models import utils as lightly_utils
    from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.modules.masked_autoencoder_timm import MAEDecoderTIMM
    from lightly.utils.scheduler import cosine_schedule, linear_warmup_schedule
except ImportError as err:
    MISSING["lightly"] = str(err)

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
PEER_FIRST_STEP = TOTAL_STEPS // 2  # steady state: past warm-ups and the prototype freeze
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
# The peers: a forward that returns the loss, and pemae's two training hooks
# --------------------------------------------------------------------------------------------
class Peer(nn.Module):
    """A peer implementation: `forward(imgs, step)` returns the loss; the hooks run around
    the optimiser step, as pemae's models' do."""

    def after_backward(self, step: int) -> None:
        """Between backward and the optimiser step."""

    def after_step(self, step: int) -> None:
        """After the optimiser step (EMA teachers)."""


def hf_config(cfg: Config) -> "ViTMAEConfig":
    """transformers' ViTMAEConfig with pemae's sizes, mask ratio and norm-pix loss."""
    m, d = cfg.model, cfg.data
    return ViTMAEConfig(
        image_size=d.img_size, patch_size=m.patch_size, num_channels=d.in_chans,
        hidden_size=m.embed_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
        intermediate_size=int(m.embed_dim * m.mlp_ratio),
        decoder_hidden_size=m.decoder_dim, decoder_num_hidden_layers=m.decoder_depth,
        decoder_num_attention_heads=m.decoder_heads,
        decoder_intermediate_size=int(m.decoder_dim * m.mlp_ratio),
        mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss,
        qkv_bias=True, hidden_act="gelu", layer_norm_eps=1e-6,  # timm's LayerNorm eps
    )


class HFMAE(Peer):
    """transformers' ViTMAEForPreTraining (masking, norm-pix MSE on masked patches built in)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.net = ViTMAEForPreTraining(hf_config(cfg))

    def forward(self, imgs: torch.Tensor, step: int) -> torch.Tensor:
        return self.net(pixel_values=imgs).loss


@contextmanager
def quiet_deprecations() -> Iterator[None]:
    """Silence the FutureWarnings of MAEDecoderTIMM and torch's old `weight_norm` (lightly's
    DINO head) while building: the modules still compute what they always did."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


class LightlyMAE(Peer):
    """MAE as lightly's example assembles it, at pemae's sizes and with norm-pix targets."""

    def __init__(self, cfg: Config):
        super().__init__()
        m, d = cfg.model, cfg.data
        self.mask_ratio, self.patch_size, self.norm_pix = m.mask_ratio, m.patch_size, m.norm_pix_loss
        self.grid = d.img_size // m.patch_size
        vit = VisionTransformer(**encoder_kwargs(m, d), num_classes=0)
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)  # MAE init, fixed sin-cos positions
        self.sequence_length = self.backbone.sequence_length  # 1 + N
        with quiet_deprecations():
            self.decoder = MAEDecoderTIMM(
                num_patches=self.grid**2, patch_size=m.patch_size, in_chans=d.in_chans,
                embed_dim=m.embed_dim, decoder_embed_dim=m.decoder_dim,
                decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_heads,
                mlp_ratio=m.mlp_ratio)

    def random_mask(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices into [CLS] + patches: kept [B, 1+V] (CLS always kept), masked [B, M]."""
        return lightly_utils.random_token_mask((batch, self.sequence_length), self.mask_ratio,
                                               device=device)

    def decode(self, latent: torch.Tensor, idx_keep: torch.Tensor) -> torch.Tensor:
        """Mask tokens everywhere but at idx_keep, then the decoder: [B, 1+V, D] -> [B, 1+N, Dd]."""
        x = self.decoder.embed(latent)  # [B, 1+V, Dd]
        tokens = lightly_utils.repeat_token(self.decoder.mask_token,
                                            (len(x), self.sequence_length))  # [B, 1+N, Dd]
        tokens = lightly_utils.set_at_index(tokens, idx_keep, x.type_as(tokens))  # [B, 1+N, Dd]
        return self.decoder.decode(tokens)  # [B, 1+N, Dd]

    def forward(self, imgs: torch.Tensor, step: int) -> torch.Tensor:
        idx_keep, idx_mask = self.random_mask(len(imgs), imgs.device)  # [B, 1+V], [B, M]
        latent = self.backbone.encode(imgs, idx_keep=idx_keep)  # [B, 1+V, D]
        decoded = lightly_utils.get_at_index(self.decode(latent, idx_keep), idx_mask)  # [B, M, Dd]
        pred = self.decoder.predict(decoded)  # [B, M, p*p*C]
        patches = lightly_utils.patchify(imgs, self.patch_size)  # [B, N, p*p*C]
        target = lightly_utils.get_at_index(patches, idx_mask - 1)  # [B, M, p*p*C], no CLS
        if self.norm_pix:
            target = lightly_utils.normalize_mean_var(target)  # [B, M, p*p*C], per patch
        return F.mse_loss(pred.float(), target.float())


def dino_head(cfg: Config) -> "DINOProjectionHead":
    """lightly's DINO head with the labelling head's sizes (3 layers, weight-normed prototypes)."""
    m = cfg.method
    if m.head_layers != 3:
        raise ValueError(f"lightly's DINOProjectionHead has 3 layers, method.head_layers = {m.head_layers}")
    with quiet_deprecations():
        return DINOProjectionHead(input_dim=cfg.model.embed_dim, hidden_dim=m.head_hidden_dim,
                                  bottleneck_dim=m.head_bottleneck_dim, output_dim=m.num_prototypes,
                                  freeze_last_layer=m.freeze_last_layer_epochs)


def frozen(module: nn.Module) -> nn.Module:
    """`module` as an EMA teacher: no gradients (lightly's `deactivate_requires_grad`)."""
    lightly_utils.deactivate_requires_grad(module)
    return module


def masked_grid(idx_mask: torch.Tensor, sequence_length: int, grid: int) -> torch.Tensor:
    """The masked patches as a boolean grid [B, h, w], from sequence indices [B, M] (CLS = 0)."""
    mask = torch.zeros(len(idx_mask), sequence_length, dtype=torch.bool,
                       device=idx_mask.device)  # [B, 1+N]
    mask.scatter_(1, idx_mask, True)
    return mask[:, 1:].reshape(-1, grid, grid)  # [B, h, w]


def teacher_features(backbone: nn.Module, imgs: torch.Tensor,
                     idx_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher on the full image: CLS [B, D] and LayerNorm-ed tokens at the masked spots [B, M, D]."""
    x = backbone.encode(imgs)  # [B, 1+N, D], after the final norm
    tokens = lightly_utils.get_at_index(x, idx_mask)  # [B, M, D]
    return x[:, 0], F.layer_norm(tokens.float(), tokens.shape[-1:])  # [B, D], [B, M, D]


class LightlyPEMAE(LightlyMAE):
    """PEMAE (dual teachers, token target, CLS + token pseudo labels) from lightly's modules."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m = cfg.method
        self.method = m
        self.decoder.decoder_pred.requires_grad_(False)  # token target: the pixel head is unused
        self.token_head = nn.Linear(cfg.model.decoder_dim, cfg.model.embed_dim)
        self.head = dino_head(cfg)
        teacher_head = dino_head(cfg)
        teacher_head.load_state_dict(self.head.state_dict())
        self.teacher_set = nn.ModuleDict({
            "rec": frozen(copy.deepcopy(self.backbone)),  # reconstruction teacher
            "lab": frozen(copy.deepcopy(self.backbone)),  # labelling teacher ...
            "lab_head": frozen(teacher_head),  # ... and its head
        })
        self.dino_loss = DINOLoss(output_dim=m.num_prototypes, teacher_temp=m.teacher_temp,
                                  student_temp=m.student_temp, center_momentum=m.center_momentum)
        self.ibot_loss = IBOTPatchLoss(output_dim=m.num_prototypes, teacher_temp=m.teacher_temp,
                                       student_temp=m.student_temp,
                                       center_momentum=m.center_momentum)

    def teacher_temp(self, step: int) -> float:
        m = self.method
        return linear_warmup_schedule(step, int(m.teacher_temp_warmup * TOTAL_STEPS),
                                      m.teacher_temp_start, m.teacher_temp)

    def forward(self, imgs: torch.Tensor, step: int) -> torch.Tensor:
        m, teachers = self.method, self.teacher_set
        idx_keep, idx_mask = self.random_mask(len(imgs), imgs.device)  # [B, 1+V], [B, M]
        latent = self.backbone.encode(imgs, idx_keep=idx_keep)  # [B, 1+V, D]
        decoded = lightly_utils.get_at_index(self.decode(latent, idx_keep), idx_mask)  # [B, M, Dd]
        y = self.token_head(decoded)  # [B, M, D]

        with torch.no_grad():  # both teachers see the full image
            _, targets = teacher_features(teachers["rec"], imgs, idx_mask)  # [B, M, D]
            lab_cls, lab_tokens = teacher_features(teachers["lab"], imgs, idx_mask)  # [B, D], [B, M, D]
            t_cls = teachers["lab_head"](lab_cls)  # [B, K]
            t_tok = teachers["lab_head"](lab_tokens)  # [B, M, K]
        s_cls = self.head(latent[:, 0])  # [B, K]
        s_tok = self.head(y)  # [B, M, K]

        temp = self.teacher_temp(step)
        loss_rec = F.mse_loss(y.float(), targets)
        loss_cls = self.dino_loss([t_cls, t_cls], [s_cls, s_cls], teacher_temp=temp)  # same view
        mask = masked_grid(idx_mask, self.sequence_length, self.grid)  # [B, h, w]
        loss_tok = self.ibot_loss(t_tok.flatten(0, 1), s_tok.flatten(0, 1), mask,
                                  teacher_temp=temp)  # [B*M, K] each
        return m.lambda_rec * loss_rec + m.lambda_cls * loss_cls + m.lambda_tok * loss_tok

    def after_backward(self, step: int) -> None:
        self.head.cancel_last_layer_gradients(step // STEPS_PER_EPOCH)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        m, teachers = self.method, self.teacher_set
        progress = min(step, TOTAL_STEPS)  # lightly's schedule warns past its end
        m_rec = cosine_schedule(progress, TOTAL_STEPS, m.momentum_rec, 1.0)
        m_lab = cosine_schedule(progress, TOTAL_STEPS, m.momentum_lab, 1.0)
        lightly_utils.update_momentum(self.backbone, teachers["rec"], m_rec)
        lightly_utils.update_momentum(self.backbone, teachers["lab"], m_lab)
        lightly_utils.update_momentum(self.head, teachers["lab_head"], m_lab)


def peer_steps(model: Peer, optimizer: torch.optim.Optimizer, imgs: torch.Tensor,
               device: torch.device, amp: str, first_step: int) -> StepFn:
    """A peer's training step on `imgs`, shaped like pemae's `train_step`."""
    steps = itertools.count(first_step)

    def run_step() -> torch.Tensor:
        step = next(steps)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = model(imgs, step)
        loss.float().backward()
        model.after_backward(step)
        optimizer.step()
        model.after_step(step)
        return loss.detach()

    return run_step


# --------------------------------------------------------------------------------------------
# The implementations
# --------------------------------------------------------------------------------------------
Builder = Callable[[Config, torch.Tensor, torch.device, str, int], Contender]


@dataclass(frozen=True)
class Implementation:
    name: str
    library: str  # the package it comes from: pemae, transformers or lightly
    build: Builder  # (cfg, imgs, device, amp, seed) -> Contender


def pemae_builder(method_overrides: dict) -> Builder:
    return lambda cfg, imgs, device, amp, seed: pemae_contender(cfg, method_overrides, imgs,
                                                                device, seed, amp)


def peer_builder(peer: type[Peer]) -> Builder:
    def build(cfg: Config, imgs: torch.Tensor, device: torch.device, amp: str,
              seed: int) -> Contender:
        torch.manual_seed(seed)
        model = peer(cfg).to(device).train()
        optimizer = adamw(model, cfg.pretrain, len(imgs))
        return Contender(model, optimizer,
                         peer_steps(model, optimizer, imgs, device, amp, PEER_FIRST_STEP))
    return build


IMPLEMENTATIONS = (
    Implementation("pemae_mae", "pemae", pemae_builder(COST_VARIANTS["mae"])),
    Implementation("hf_mae", "transformers", peer_builder(HFMAE)),
    Implementation("lightly_mae", "lightly", peer_builder(LightlyMAE)),
    Implementation("pemae_single", "pemae", pemae_builder(COST_VARIANTS["pemae_single"])),
    Implementation("pemae_dual", "pemae", pemae_builder(COST_VARIANTS["pemae_dual"])),
    Implementation("lightly_pemae", "lightly", peer_builder(LightlyPEMAE)),
)
RATIOS = (("pemae_mae", "hf_mae"), ("pemae_mae", "lightly_mae"),
          ("pemae_dual", "lightly_pemae"), ("pemae_dual", "pemae_single"))


def library_version(library: str) -> str:
    try:
        return f"{library} {importlib.metadata.version(library)}"
    except importlib.metadata.PackageNotFoundError:
        return library


def available(verbose: bool = True) -> tuple[list[Implementation], list[dict]]:
    """The implementations whose library imports, and a note for each one skipped."""
    kept, skipped = [], []
    for impl in IMPLEMENTATIONS:
        if impl.library in MISSING:
            note = (f"skipped {impl.name}: {impl.library} cannot be imported "
                    f"({MISSING[impl.library]}); pip install -e '.[bench]'")
            skipped.append({"implementation": impl.name, "library": impl.library, "note": note})
            if verbose:
                print(note)
        else:
            kept.append(impl)
    return kept, skipped


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
    keep_freed_memory()  # the allocator the training loop runs on (pemae.distributed.start), for all
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


def parse_sizes(values: list[str] | None) -> list[str]:
    """--size given any number of times, each a name or a comma list; default issue, default."""
    names = [n.strip() for v in (values or ["issue,default"]) for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        raise SystemExit(f"unknown --size {', '.join(unknown)}: choose from {', '.join(SIZES)}")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", help=f"{', '.join(SIZES)}; repeatable or a "
                        "comma list (default: issue,default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every implementation (FLOPs and memory stay eager)")
    parser.add_argument("--out", default="results/bench", help="folder for bench.md and bench.json")
    args = parser.parse_args(argv)
    return run_benchmark(parse_sizes(args.size), args.rounds, args.warmup, args.steps,
                         args.device, args.dtype, args.out, compile=args.compile)


if __name__ == "__main__":
    main()
