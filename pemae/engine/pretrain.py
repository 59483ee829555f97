"""Self-supervised pretraining: one loop for every method, on CPU or CUDA, in one process or
many (DDP under `torchrun`), with gradient accumulation and exact resume.

Files written into `out_dir` (rank 0 only):
  last.pt        the full training state, every `pretrain.checkpoint_every` steps while the run is
                 unfinished; a restarted run with the same config continues from it
  last.prev.pt   the checkpoint before last.pt: a restart falls back to it when last.pt is unreadable
  checkpoint.pt  the same state at the end (last.pt renamed once everything else is written); a
                 rerun into a folder that holds it has nothing to do (same config), is refused
                 (another config), or with `pretrain.overwrite` trains again and replaces it
  encoder.pt     the student encoder alone, for timm
  config.yaml    the resolved config
  log.csv        per-step metrics (loss terms, lr, images/s, peak memory); continued on resume
  summary.json   the run's totals and collapse flags
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pemae.config.params import build_config
from pemae.config.schema import Config, ConfigError
from pemae.data.datasets import build_dataset, skipped_images
from pemae.data.transforms import pretrain_transform
from pemae.engine import checkpoint, distributed
from pemae.engine.batching import batch_for_data, micro_batch_size, peak_lr, with_accumulation
from pemae.engine.optim import adamw, param_groups, set_lr
from pemae.engine.runtime import (MetricLog, amp_dtype, autocast, compile_seconds, grad_scaler,
                                  peak_memory_mb, read_log, rng_state, seed_everything,
                                  set_rng_state)
from pemae.engine.sampling import GlobalBatchSampler, SeededViews
from pemae.engine.schedules import warmup_cosine, warmup_step_count
from pemae.engine.state import (interrupted_state, load_training_state, optimizer_update,
                                refuse_other_config, training_state)
from pemae.models.monitors import collapse_report
from pemae.models.pemae import build_pretrain_model, num_views


# Keys that may change when an interrupted run is resumed: where and how fast it runs, not what
# it computes (the batches do not depend on processes, accumulation or workers: pemae.engine.sampling).
RESUMABLE_KEYS = ("data.root", "data.download", "data.num_workers", "data.skip_bad",
                  "pretrain.device", "pretrain.amp", "pretrain.compile", "pretrain.accum_steps",
                  "pretrain.micro_batch_size",
                  "pretrain.log_every", "pretrain.checkpoint_every", "pretrain.resume",
                  "pretrain.overwrite")
PRETRAIN_SECTIONS = ("data", "model", "method", "pretrain")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the loss terms."""


# --------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------
def micro_step(net: nn.Module, imgs: torch.Tensor, step: int, device: torch.device, amp: str = "auto",
               noise: torch.Tensor | None = None, scaler: torch.amp.GradScaler | None = None,
               loss_weight: float = 1.0, sync: bool = True, monitor: bool = True,
               view2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Forward and backward of one micro-batch; gradients add up until the update.

    `net` may be DDP-wrapped; `sync=False` skips its gradient all-reduce (all but the last
    micro-batch of a step); `view2` is the second view of a two-view model. Returns the model's
    scalars (loss terms and, with `monitor`, the collapse monitors), detached.
    """
    no_sync = getattr(net, "no_sync", None)
    with no_sync() if (no_sync is not None and not sync) else nullcontext():
        with autocast(device, amp):
            out = net(imgs, step, noise=noise, monitor=monitor, view2=view2)
        loss = out["loss"].float() * loss_weight
        (scaler.scale(loss) if scaler is not None else loss).backward()
    return {k: v.detach() for k, v in out.items() if v.ndim == 0}


def apply_update(model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                 scaler: torch.amp.GradScaler | None = None) -> None:
    """The optimiser step on the summed gradients, between the model's own hooks (teachers)."""
    model.after_backward(step)
    optimizer_update(optimizer, scaler)
    model.after_step(step)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, imgs: torch.Tensor,
               device: torch.device, step: int, amp: str = "auto",
               noise: torch.Tensor | None = None, view2: torch.Tensor | None = None,
               monitor: bool = True) -> dict[str, torch.Tensor]:
    """One whole step on one batch in one process: forward, backward, update (student), then
    the model's own update (teachers, centres). Returns the model's scalars, detached
    (`monitor=False`: the loss terms only, as on the training loop's unlogged steps)."""
    optimizer.zero_grad(set_to_none=True)
    terms = micro_step(model, imgs, step, device, amp, noise, view2=view2, monitor=monitor)
    apply_update(model, optimizer, step)
    return terms


# --------------------------------------------------------------------------------------------
# Guarding against a diverged run
# --------------------------------------------------------------------------------------------
class FiniteLossGuard:
    """Holds each step's loss terms (on the device) until `check`: one host sync per check, not
    per step. Checked before every log row and every checkpoint, so no checkpoint is ever written
    from a diverged model."""

    def __init__(self):
        self.pending: list[tuple[int, dict[str, torch.Tensor]]] = []

    def add(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        self.pending.append((step, {k: v for k, v in terms.items() if k.startswith("loss")}))

    def check(self, last_good: str) -> None:
        """Raise NonFiniteLossError naming the first bad step and its terms (on any process)."""
        if not self.pending:
            return
        finite = torch.stack([torch.isfinite(t["loss"]) for _, t in self.pending])  # [S]
        if distributed.any_true(~finite.all()):
            bad = [(s, t) for (s, t), ok in zip(self.pending, finite.tolist()) if not ok]
            if bad:
                step, terms = bad[0]
                values = {k: v.item() for k, v in terms.items()}
                shown = ", ".join(f"{k} = {v:.4g}" for k, v in values.items())
                culprits = ", ".join(k for k, v in values.items() if not math.isfinite(v))
                where = f"step {step}: {shown} (non-finite: {culprits})"
            else:
                where = "a step on another process"
            raise NonFiniteLossError(f"non-finite loss at {where}. Training stopped; {last_good}")
        self.pending.clear()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def pretraining_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler, cfg: Config, step: int, total_steps: int,
                      steps_per_epoch: int, seconds: float) -> dict:
    """The training state of a pretraining run: with its grad scaler, RNG state and total steps."""
    return training_state(model, optimizer, cfg, step, steps_per_epoch, seconds,
                          restore={"scaler": scaler.state_dict(), "rng": rng_state()},
                          totals={"total_steps": total_steps})


def resume_pretraining(path: Path, state: dict, cfg: Config, steps_per_epoch: int,
                       model: nn.Module, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler) -> None:
    """Load an interrupted run's `state` (read from `path`) into the model, optimiser, scaler and
    RNGs.

    The config must match the saved one except for `RESUMABLE_KEYS`; otherwise a ConfigError
    names every differing key.
    """
    refuse_other_config(state, cfg, f"{path} is an interrupted run",
                        f"Set those keys back to resume it, or delete {path} (or set "
                        "pretrain.resume: false) to start afresh.",
                        PRETRAIN_SECTIONS, RESUMABLE_KEYS)
    load_training_state(path, state, steps_per_epoch, model, optimizer)
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def completed_run(final_path: Path, cfg: Config, device: torch.device,
                  is_main: bool) -> tuple[nn.Module, dict]:
    """A rerun into a folder that holds a completed run (`final_path`, its checkpoint.pt).

    With the same config (but for `RESUMABLE_KEYS`) there is nothing to do: nothing is written, and
    the run's model and summary (summary.json; {} on other ranks than 0) are returned. With another
    config a ConfigError names every differing key.
    """
    out_dir = final_path.parent
    state = checkpoint.load(final_path)
    refuse_other_config(state, cfg, f"{out_dir} holds a completed run",
                        "Set those keys back, write to another --out folder, or train again over "
                        "it with --force (pretrain.overwrite: true).",
                        PRETRAIN_SECTIONS, RESUMABLE_KEYS)
    model, _ = model_from_state(state)
    if not is_main:
        return model.to(device), {}
    print(f"run in {out_dir} is complete (step {state['step']}); nothing to do (--force or "
          "pretrain.overwrite: true trains it again)")
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"steps": state["step"]}
    return model.to(device), summary


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def pretrain(cfg: Config, out_dir: str | Path, progress: bool = True) -> tuple[nn.Module, dict]:
    """Pretrain `cfg.method` into `out_dir` (see the module docstring for the files).

    One process by default; under `torchrun` one DDP process per device. Returns the trained
    model and the summary (the summary on rank 0 only; other ranks get {}). An interrupted run in
    `out_dir` is resumed; a completed one is returned as saved when the config is the same (and
    refused when it is not) unless `pretrain.overwrite` trains it again.
    """
    procs, device = distributed.start(cfg.pretrain.device)
    try:
        return _pretrain(cfg, Path(out_dir), progress, procs, device)
    finally:
        distributed.stop(procs)


def _pretrain(cfg: Config, out_dir: Path, progress: bool, procs: distributed.Processes,
              device: torch.device) -> tuple[nn.Module, dict]:
    seed_everything(cfg.pretrain.seed)
    dataset = build_dataset(cfg.data, "train", pretrain_transform(cfg.data))
    cfg = batch_for_data(cfg, len(dataset), procs.world_size)  # saved and resumed as resolved
    cfg = with_accumulation(cfg, procs.world_size)
    pc, main = cfg.pretrain, procs.is_main
    micro = micro_batch_size(pc.batch_size, pc.accum_steps, procs.world_size)
    if len(dataset) < pc.batch_size:
        raise ConfigError(f"pretrain.batch_size = {pc.batch_size} exceeds the {len(dataset)} training images")
    steps_per_epoch = len(dataset) // pc.batch_size
    total_steps = pc.epochs * steps_per_epoch

    last_path, prev_path = out_dir / "last.pt", out_dir / "last.prev.pt"
    final_path = out_dir / "checkpoint.pt"
    found = interrupted_state([last_path, prev_path]) if pc.resume else None
    if found is None and final_path.is_file():
        if not pc.overwrite:
            return completed_run(final_path, cfg, device, main)
        if main:
            print(f"pretrain.overwrite: training again over the completed run in {out_dir}")

    model = build_pretrain_model(cfg, total_steps, steps_per_epoch).to(device)
    optimizer = adamw(param_groups(model, pc.weight_decay), device, lr=0.0, betas=tuple(pc.betas))
    scaler = grad_scaler(device, pc.amp)
    resumed_path, state = found or (None, {})
    if found:
        resume_pretraining(resumed_path, state, cfg, steps_per_epoch, model, optimizer, scaler)
    start_step, seconds_before = state.get("step", 0), state.get("seconds", 0.0)
    del state, found
    last_good = (f"the last good checkpoint, {resumed_path} (step {start_step}), is untouched"
                 if start_step else "no checkpoint had been written yet")

    student = getattr(model, "student", model)
    loader = DataLoader(
        SeededViews(dataset, pc.seed, student.num_patches, num_views(cfg)),
        batch_sampler=GlobalBatchSampler(len(dataset), pc.batch_size, total_steps, pc.seed,
                                         procs.world_size, procs.rank, pc.accum_steps, start_step),
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    net = distributed.wrap(model, procs, device)
    if pc.compile:  # after the DDP wrap, so that DDP's bucketing sees the compiled graph
        net.compile()  # in place: the state dict keeps its keys
    lr = peak_lr(pc.batch_size, pc.base_lr)
    warmup_steps = warmup_step_count(pc.warmup_epochs, steps_per_epoch, total_steps)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")
        precision = amp_dtype(pc.amp, device) or torch.float32
        print(f"pretraining {cfg.method.name}: {len(dataset)} images, {pc.epochs} epochs x "
              f"{steps_per_epoch} steps; {procs.world_size} process(es) x {micro} images x "
              f"{pc.accum_steps} accumulation step(s) = batch {pc.batch_size}; base lr "
              f"{pc.base_lr:g} -> lr {lr:g}; device {device.type}, {str(precision)[6:]}"
              + ("; compiled (the first steps compile)" if pc.compile else "")
              + (f"; resuming at step {start_step} from {resumed_path}" if start_step else ""))

    log = MetricLog(out_dir / "log.csv", keep_until=start_step if start_step else None) if main else None
    guard = FiniteLossGuard()
    bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and main),
               desc=f"pretrain {cfg.method.name}")
    step, seconds = start_step, seconds_before
    window_start, window_step = time.perf_counter(), start_step
    terms: dict[str, torch.Tensor] = {}
    model.train()
    try:
        for i, (imgs, noise, *second) in enumerate(loader):  # second: [view2] under views: 2
            a = i % pc.accum_steps
            if a == 0:
                set_lr(optimizer, warmup_cosine(step, total_steps, lr, pc.min_lr, warmup_steps))
                optimizer.zero_grad(set_to_none=True)
                terms = {}
            logged = (step + 1) % pc.log_every == 0 or step + 1 == total_steps
            micro_terms = micro_step(net, imgs.to(device, non_blocking=True), step, device, pc.amp,
                                     noise.to(device, non_blocking=True), scaler,
                                     loss_weight=1 / pc.accum_steps, sync=a == pc.accum_steps - 1,
                                     monitor=logged,
                                     view2=second[0].to(device, non_blocking=True) if second else None)
            for k, v in micro_terms.items():  # [] each: the step's mean over its micro-batches
                terms[k] = terms.get(k, 0.0) + v / pc.accum_steps
            if a < pc.accum_steps - 1:
                continue
            apply_update(model, optimizer, step, scaler)
            step += 1
            guard.add(step, terms)
            bar.update()

            if logged:
                guard.check(last_good)
                now = time.perf_counter()
                seconds += now - window_start
                rate = (step - window_step) * pc.batch_size / (now - window_start)
                window_start, window_step = now, step
                row = distributed.mean_over_processes(
                    {**terms, "skipped_images": torch.tensor(float(skipped_images(dataset)), device=device)})
                row["skipped_images"] *= procs.world_size  # a sum over processes
                if main:
                    log.append(step=step, epoch=step / steps_per_epoch, lr=optimizer.param_groups[0]["lr"],
                               images_per_s=rate, peak_mem_mb=peak_memory_mb(device), **row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{rate:.0f}")
            if pc.checkpoint_every and step % pc.checkpoint_every == 0 and step < total_steps:
                guard.check(last_good)
                distributed.check_replicas_agree(model)
                if main:
                    checkpoint.save_atomic(pretraining_state(model, optimizer, scaler, cfg, step, total_steps,
                                                             steps_per_epoch, seconds), last_path, prev_path)
                last_good = f"the last good checkpoint, {last_path} (step {step}), is untouched"
    finally:  # the bar ends its line before any message
        bar.close()
    guard.check(last_good)
    distributed.check_replicas_agree(model)
    if not main:
        return model, {}

    log.close()
    checkpoint.save_atomic(pretraining_state(model, optimizer, scaler, cfg, step, total_steps,
                                             steps_per_epoch, seconds), last_path, prev_path)
    checkpoint.export_encoder(model.encoder, cfg, out_dir / "encoder.pt")
    summary = run_summary(out_dir / "log.csv", cfg, step, seconds, device, procs.world_size)
    if summary.get("collapsed"):
        print(f"WARNING: this run collapsed (its pseudo labels or its token targets): {summary}")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(last_path, final_path)  # the run is complete: nothing left to resume
    prev_path.unlink(missing_ok=True)
    return model, summary


def run_summary(log_path: Path, cfg: Config, steps: int, seconds: float, device: torch.device,
                world_size: int) -> dict:
    """Totals of a finished run, with the last logged row's loss and collapse monitors."""
    log = read_log(log_path)
    last = {k: float(v[-1]) for k, v in log.items()} if log else {}
    images = steps * cfg.pretrain.batch_size
    return {"steps": steps, "images_seen": images, "seconds": round(seconds, 1),
            "images_per_s": round(images / seconds, 1) if steps and seconds else 0.0,
            "peak_memory_mb": round(last.get("peak_mem_mb", peak_memory_mb(device)), 1),
            "world_size": world_size, "accum_steps": cfg.pretrain.accum_steps,
            "skipped_images": int(last.get("skipped_images", 0)),
            **({"compile_seconds": round(compile_seconds(), 1)} if cfg.pretrain.compile else {}),
            "final_loss": last.get("loss"),
            **(collapse_report(last, cfg.method.num_prototypes) if steps else {})}


def model_from_state(state: dict) -> tuple[nn.Module, Config]:
    """The pretraining model (student, heads, teachers) of a loaded checkpoint, and its config."""
    cfg = build_config("default", state["config"])
    # the schedule lengths only shape training: absent, any value rebuilds the same modules
    model = build_pretrain_model(cfg, state.get("total_steps", state["step"]),
                                 state.get("steps_per_epoch", 1))
    model.load_state_dict(state["model"])
    return model, cfg


def load_pretrained(path: str | Path) -> tuple[nn.Module, Config]:
    """Rebuild a pretraining model (student, heads, teachers) from its checkpoint, in eval mode."""
    model, cfg = model_from_state(checkpoint.load(path))
    return model.eval(), cfg
