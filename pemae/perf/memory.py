"""Memory of one training step of a `Contender` (a model, its optimiser and one step): on the CPU
its state plus what autograd saves for backward, on CUDA the allocator's peak."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn


MB = 2**20


# --------------------------------------------------------------------------------------------
# One implementation, ready to measure
# --------------------------------------------------------------------------------------------
StepFn = Callable[[], object]  # one whole training step on the fixed batch


@dataclass
class Contender:
    """An implementation ready to be measured on one fixed batch.

    `model` holds everything a step keeps between steps (student, heads, EMA teachers, loss
    centres); `run_step()` does one whole training step (forward, backward, AdamW step, EMA
    update), each call at the next step index.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    run_step: StepFn


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    """(data pointer, bytes) of the storage a tensor lives in; views share their base's."""
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Everything a training step keeps between steps: weights and buffers (teachers included),
    gradients, and the optimiser state (AdamW: exp_avg, exp_avg_sq, step)."""
    yield from model.parameters()
    yield from model.buffers()
    yield from (p.grad for p in model.parameters() if p.grad is not None)
    for state in optimizer.state.values():
        yield from (v for v in state.values() if torch.is_tensor(v))


def distinct_bytes(tensors: Iterable[torch.Tensor], device: torch.device) -> dict[int, int]:
    """{data pointer: bytes} of the distinct storages on `device` among `tensors`."""
    out: dict[int, int] = {}
    for t in tensors:
        if t.device.type == device.type:
            ptr, nbytes = _storage_key(t)
            if ptr:  # empty tensors own no memory
                out[ptr] = nbytes
    return out


@contextmanager
def saved_for_backward(exclude: set[int]) -> Iterator[dict[int, int]]:
    """Record {data pointer: bytes} of every distinct storage autograd saves for backward.

    Storages whose pointer is in `exclude` (weights already counted as state) are skipped.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage_key(t)
        if ptr and ptr not in exclude:
            seen[ptr] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def measure_memory(contender: Contender, device: torch.device) -> dict:
    """Memory of one training step of `contender` (runs one step, two on CUDA).

    Always reported:
      state_mb  weights and buffers of the whole model (student, heads, every EMA teacher),
                gradients and AdamW state, each distinct storage on `device` once;
      saved_mb  every distinct storage autograd saves for backward during the forward
                (activations, the input batch, teacher targets used by the losses), weights
                excluded (already in state_mb).
    peak_memory_mb, by `memory_kind`:
      "cpu_step_estimate"    state_mb + saved_mb. There is no allocator peak counter on the CPU,
                             so this leaves out transient buffers freed within the forward or
                             backward (attention scores, GELU inputs never saved, ...) and the
                             teachers' forward activations: teachers run under no_grad, nothing
                             of theirs is saved for backward. Only their weights are counted.
      "cuda_peak_allocated"  state_mb + how far the caching allocator's allocated bytes rose
                             above their level just before the step (torch.cuda max/peak
                             counters): every transient, teacher activations included. Other
                             variants' models, resident on the same GPU, are excluded.
    """
    model, optimizer = contender.model, contender.optimizer
    weights = distinct_bytes([*model.parameters(), *model.buffers()], device)
    with saved_for_backward(set(weights)) as saved:
        contender.run_step()
    state = distinct_bytes(state_tensors(model, optimizer), device)  # after: grads and AdamW state exist
    row = {"state_mb": sum(state.values()) / MB, "saved_mb": sum(saved.values()) / MB}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        contender.run_step()
        torch.cuda.synchronize(device)
        rise = torch.cuda.max_memory_allocated(device) - before
        row.update(peak_memory_mb=row["state_mb"] + rise / MB, memory_kind="cuda_peak_allocated")
    else:
        row.update(peak_memory_mb=row["state_mb"] + row["saved_mb"], memory_kind="cpu_step_estimate")
    return row
