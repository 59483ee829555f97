"""One process by default; PyTorch DDP when launched by `torchrun` (nccl on CUDA, gloo on CPU).

Every collective here is guarded: in a single process the functions are no-ops, so the same
training loop runs under `python`, a notebook, or `torchrun --nproc_per_node N`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from pemae.engine.runtime import keep_freed_memory, pick_device, use_fast_cuda_math


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average over processes under torch.distributed; the identity in one process."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def global_max(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def global_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


@dataclass(frozen=True)
class Processes:
    """Where this process stands among the training processes."""

    rank: int = 0
    world_size: int = 1
    started_here: bool = False  # this code created the process group (and so destroys it)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, shows progress bars and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device_name: str) -> tuple[Processes, torch.device]:
    """Pick the device and, under torchrun, join the process group (nccl on CUDA, gloo on CPU);
    glibc's malloc keeps freed memory from here on (`pemae.engine.runtime.keep_freed_memory`), and a GPU
    runs fp32 matmuls on TF32 tensor cores (`pemae.engine.runtime.use_fast_cuda_math`)."""
    keep_freed_memory()
    device = pick_device(device_name)
    use_fast_cuda_math(device)
    if dist.is_available() and dist.is_initialized():  # the caller set it up
        return Processes(dist.get_rank(), dist.get_world_size()), device
    if not launched_by_torchrun():
        return Processes(), device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), started_here=True), device


def stop(procs: Processes) -> None:
    if procs.started_here and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, procs: Processes, device: torch.device) -> nn.Module:
    """DDP over the trainable weights when distributed; the model itself otherwise.

    Every trainable weight takes part in every step (PEMAE freezes what it does not use), so
    `find_unused_parameters` stays off; the centres are all-reduced by the model, not broadcast.
    """
    if not procs.distributed:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def any_true(flag: torch.Tensor) -> bool:
    """Whether `flag` (a bool tensor) is true on any process: one host sync."""
    flag = flag.to(torch.int32)
    if dist.is_available() and dist.is_initialized():
        flag = flag.clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def mean_over_processes(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalars averaged over processes (one all-reduce), as floats."""
    stacked = torch.stack([v.float() for v in values.values()])  # [T]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(values, stacked.tolist()))


def check_replicas_agree(model: nn.Module) -> None:
    """Raise if the processes' copies of the model differ (weights, teachers, centres).

    Compares one checksum per tensor across processes (min vs max): a cheap guard run at each
    checkpoint, which would catch an un-reduced centre or a teacher updated on one rank only.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    names, tensors = zip(*[(n, t) for n, t in model.state_dict().items() if t.is_floating_point()])
    sums = torch.stack([t.detach().double().sum() for t in tensors])  # [T]
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = [n for n, lo, hi in zip(names, low.tolist(), high.tolist())
              if abs(hi - lo) > 1e-6 * max(1.0, abs(hi))]
    if differ:
        raise RuntimeError(f"the processes' model copies differ in {len(differ)} tensors, "
                           f"e.g. {', '.join(differ[:5])}")


# --------------------------------------------------------------------------------------------
# Sharded evaluation: whole batches per process, gathered back in dataset order
# --------------------------------------------------------------------------------------------
def batch_shard(num_items: int, batch_size: int, procs: Processes) -> range:
    """The items this process handles: a contiguous run of whole `batch_size` batches.

    Every batch a process sees is a batch one process would see too (the same items, the same
    shape), so per-item results (features, logits) are one process's, bit for bit, and the shards
    concatenated in rank order are the dataset in order. One process: every item; a process left
    without a batch (more processes than batches): an empty range.
    """
    batches = -(-num_items // batch_size)
    first = procs.rank * batches // procs.world_size
    last = (procs.rank + 1) * batches // procs.world_size
    return range(min(first * batch_size, num_items), min(last * batch_size, num_items))


def dataset_shard(dataset: Dataset, batch_size: int, procs: Processes) -> Dataset:
    """This process's `batch_shard` of `dataset`; the dataset itself in one process."""
    if not procs.distributed:
        return dataset
    return Subset(dataset, batch_shard(len(dataset), batch_size, procs))


def collective_device() -> torch.device:
    """Where the process group's tensors live: this process's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def row_counts(rows: torch.Tensor, procs: Processes) -> list[int]:
    """How many rows each process holds, in rank order, on every process (one all-gather)."""
    count = torch.tensor([len(rows)], device=collective_device())  # [1]
    counts = [torch.zeros_like(count) for _ in range(procs.world_size)]
    dist.all_gather(counts, count)
    return [int(c.item()) for c in counts]


def padded_rows(rows: torch.Tensor, length: int) -> torch.Tensor:
    """`rows` [n, ...] padded with zeros to `length` rows, on the collective device: what every
    process sends to a gather, whatever its own count. [length, ...]"""
    padded = rows.new_zeros((length, *rows.shape[1:]), device=collective_device())  # [length, ...]
    padded[:len(rows)] = rows.to(padded.device)
    return padded


def gather_rows(rows: torch.Tensor, procs: Processes) -> torch.Tensor:
    """Every process's rows [n_r, ...] concatenated in rank order, on every process, on the device
    of `rows`: [sum of n_r, ...]. The shards may differ in length (padded for the all-gather,
    then trimmed). One process: `rows` itself."""
    if not procs.distributed:
        return rows
    lengths = row_counts(rows, procs)
    padded = padded_rows(rows, max(lengths))  # [max n_r, ...]
    parts = [torch.empty_like(padded) for _ in range(procs.world_size)]
    dist.all_gather(parts, padded)
    gathered = torch.cat([part[:n] for part, n in zip(parts, lengths)])  # [sum of n_r, ...]
    return gathered.to(rows.device)


def gather_rows_to_main(rows: torch.Tensor, procs: Processes) -> torch.Tensor:
    """`gather_rows` onto the main process alone (one gather, not an all-gather: the other
    processes hold no copy): [sum of n_r, ...] on rank 0, no rows (`rows[:0]`) elsewhere, on the
    device of `rows`. One process: `rows` itself."""
    if not procs.distributed:
        return rows
    lengths = row_counts(rows, procs)
    padded = padded_rows(rows, max(lengths))  # [max n_r, ...]
    parts = [torch.empty_like(padded) for _ in range(procs.world_size)] if procs.is_main else None
    dist.gather(padded, parts, dst=0)
    if not procs.is_main:
        return rows[:0]  # [0, ...]
    gathered = torch.cat([part[:n] for part, n in zip(parts, lengths)])  # [sum of n_r, ...]
    return gathered.to(rows.device)


def sum_over_processes(counts: list[int], procs: Processes) -> list[int]:
    """Integer counts summed over processes (one all-reduce); `counts` itself in one process."""
    if not procs.distributed:
        return counts
    summed = torch.tensor(counts, dtype=torch.int64, device=collective_device())  # [T]
    dist.all_reduce(summed)
    return summed.tolist()


def broadcast_from_main(values: list[float], procs: Processes) -> list[float]:
    """The main process's `values` on every process (one broadcast, in float64: a Python float
    arrives bit for bit); every process passes a list of the same length (the others' values are
    placeholders). `values` itself in one process."""
    if not procs.distributed:
        return values
    shared = torch.tensor(values, dtype=torch.float64, device=collective_device())  # [T]
    dist.broadcast(shared, src=0)
    return shared.tolist()


def gather_objects(obj: object, procs: Processes) -> list:
    """Every process's `obj` (picklable: RNG states), in rank order, on every process; [obj] in
    one process."""
    if not procs.distributed:
        return [obj]
    out: list = [None] * procs.world_size
    dist.all_gather_object(out, obj)
    return out


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or the only process (also once the group is gone)."""
    return int(os.environ.get("RANK", "0")) == 0
