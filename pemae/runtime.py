"""Run-time set-up shared by every loop: device choice, seeding, a CSV metric log."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import torch

from pemae.config import ConfigError


def pick_device(name: str, key: str = "pretrain.device") -> torch.device:
    """'auto' -> CUDA when available, else CPU; an unavailable 'cuda' is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} = 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU (bf16 is slower there)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class MetricLog:
    """Append-only CSV of per-step metrics (read by `dvc plots` and the figures notebook)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self._writer = None
        self._file = None

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
