"""Run-time set-up shared by every loop: device, precision, seeding, RNG state, memory, a CSV log."""

from __future__ import annotations

import csv
import ctypes
import os
import random
import resource
from pathlib import Path

import numpy as np
import torch

from pemae.config.schema import ConfigError


MB = 2**20


def pick_device(name: str, key: str = "pretrain.device") -> torch.device:
    """'auto' -> CUDA when available, else CPU; an unavailable 'cuda' is a config error.

    Under torchrun a CUDA device is the process's own GPU (LOCAL_RANK).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} = 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def has_bf16_tensor_cores(device: torch.device) -> bool:
    """Whether a CUDA device computes bf16 natively (compute capability 8.0 or newer: A100, H100,
    ...); before that bf16 is emulated or refused."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `pretrain.amp` on `device`: auto = bf16 on a GPU with bf16 tensor
    cores, fp16 on an older GPU, fp32 (None) on the CPU. bf16 asked of an older GPU is a
    ConfigError."""
    if device.type != "cuda" and amp == "auto":
        return None
    if amp == "auto":
        return torch.bfloat16 if has_bf16_tensor_cores(device) else torch.float16
    if amp == "bf16" and device.type == "cuda" and not has_bf16_tensor_cores(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"pretrain.amp = 'bf16' but {torch.cuda.get_device_name(device)} (compute "
                          f"capability {major}.{minor}) has no bf16 tensor cores: use 'fp16' or 'auto'")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, amp: str = "auto"):
    """Mixed precision for the forward pass (matmuls in bf16/fp16); losses cast to fp32 themselves."""
    dtype = amp_dtype(amp, device)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(device: torch.device, amp: str = "auto") -> torch.amp.GradScaler:
    """Loss scaling, enabled exactly when the forward runs in fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(amp, device) is torch.float16)


def use_fast_cuda_math(device: torch.device) -> None:
    """On a GPU: fp32 matmuls and convolutions on TF32 tensor cores (what stays fp32 under
    autocast: the prototype layer, the losses, the probes). Nothing changes on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# glibc malloc's knobs (mallopt): its defaults hand large freed blocks straight back to the OS, so
# every training step maps and page-faults its activations afresh (7.5M minor page faults in one
# epoch of the default MAE run); keeping them costs no arithmetic and gave 7-17% more img/s there
# (835-864 -> 896-979 img/s, 30x fewer faults)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
ALLOCATOR_SETTINGS = {M_MMAP_THRESHOLD: 32 << 20,  # blocks under 32 MB come from the heap
                      M_TRIM_THRESHOLD: 1 << 30,  # give memory back only past 1 GB free at the top
                      M_TOP_PAD: 256 << 20}  # and grow the heap 256 MB at a time


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (`ALLOCATOR_SETTINGS`) instead of returning
    it to the OS after each step; what the `MALLOC_*_` environment variables would set. Returns
    False where the C library is not glibc (nothing changes there). Results are unaffected: only
    where memory comes from changes."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(option, value) == 1 for option, value in ALLOCATOR_SETTINGS.items())


# torch._dynamo's timing phases that hold the whole of a compilation: the forward graph (Dynamo
# tracing + Inductor) and the backward graph, compiled lazily on the first backward
COMPILE_PHASES = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")


def compile_seconds() -> float:
    """Seconds this process has spent compiling with `torch.compile` so far (forward and backward
    graphs, recompilations included); 0.0 when nothing was compiled."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    return sum(float(v) for n, v in zip(names, values) if n in COMPILE_PHASES)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA RNG states, as tensors and plain values (weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (CUDA states only where the same GPUs exist)."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's peak on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricLog:
    """Append-only CSV of per-step metrics (read by `dvc plots` and the figures notebook).

    A new log replaces any old file; `keep_until=s` continues a resumed run's log instead: rows up
    to step s are kept (rows after it were logged past the checkpoint and will be logged again).
    """

    def __init__(self, path: str | Path, keep_until: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = None
        self._file = None
        if keep_until is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                rows = [r for r in reader if r.get("step") and float(r["step"]) <= keep_until]
                fields = reader.fieldnames
            if rows:
                tmp = self.path.with_name(f".{self.path.name}.tmp")  # rewrite atomically
                with tmp.open("w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows(rows)
                os.replace(tmp, self.path)
                self._file = self.path.open("a", newline="")
                self._writer = csv.DictWriter(self._file, fieldnames=fields)
                return
        self.path.unlink(missing_ok=True)

    def append(self, **row: float) -> None:
        if self._writer is None:
            self._file = self.path.open("w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=list(row))
            self._writer.writeheader()
        self._writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        else:  # nothing was logged (e.g. zero steps): leave an empty table, not a missing file
            self.path.write_text("step\n")


def read_log(path: str | Path) -> dict[str, np.ndarray]:
    """A MetricLog CSV as columns of floats."""
    with Path(path).open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}
