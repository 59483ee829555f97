"""A CPU-run guard against device mixing: the training device made distinct from the default one.

On a machine without a GPU the training device and the default device are both the CPU, so a
tensor made without `device=` inside a step (`torch.tensor(x)`) works here and crashes the first
CUDA step that mixes it with the step's tensors. Under `TrainingDeviceIsNotTheDefault`, every
tensor factory called from pemae's own step, probe or log code without a device (and without a
generator, which fixes the device itself) makes its tensor on the `meta` device instead: mixing it
with a real tensor, or reading its value, fails on the CPU exactly where it would fail on a GPU.

Host-side code is left alone: module constructors (`__init__`, whose tensors move with the module),
and the modules and functions that build host batches and figures before anything meets the device.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.overrides
from torch.overrides import TorchFunctionMode

import pemae

PEMAE_DIR = str(Path(pemae.__file__).parent)
OVERRIDES_FILE = torch.overrides.__file__

FACTORIES = {torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.zeros, torch.ones, torch.empty,
             torch.full, torch.arange, torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn,
             torch.randint, torch.randperm}

# host-side modules: image loading, batching, figures, benchmarks (what they make is moved later)
# host-side code (data loading, configs, reports, benchmarks, studies, scene composition): any
# tensor it makes is moved to the device by the step code that uses it
HOST_PACKAGES = {"data", "config", "report", "perf", "studies"}
HOST_MODULES = {"engine/sampling", "models/pos_embed", "bench", "cost", "gpu_check", "results"}
# host-side functions of mixed modules: the dense probe's scene composition
HOST_FUNCTIONS = {("eval/scenes", name)
                  for name in ("draw_placements", "compose_scenes", "load_items", "build_scenes")}


def pemae_caller() -> tuple[str, str, int] | None:
    """(module, function, line) of the code that called the factory, when it is pemae step code;
    None for any other caller (torch itself: its DataLoader and optimisers; timm; tests;
    host-side pemae code)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename in (__file__, OVERRIDES_FILE):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(PEMAE_DIR):
        return None
    module = Path(frame.f_code.co_filename).relative_to(PEMAE_DIR).with_suffix("").as_posix()
    function = frame.f_code.co_name
    if (module.split("/")[0] in HOST_PACKAGES or module in HOST_MODULES or function == "__init__"
            or (module, function) in HOST_FUNCTIONS):
        return None
    return module, function, frame.f_lineno


class TrainingDeviceIsNotTheDefault(TorchFunctionMode):
    """Tensor factories called from pemae step code without `device=` make meta tensors; the
    call sites are listed in `self.redirected` (module, function, line)."""

    def __init__(self):
        super().__init__()
        self.redirected: list[tuple[str, str, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if (func in FACTORIES and kwargs.get("device") is None and "generator" not in kwargs
                and not (args and isinstance(args[0], torch.Tensor))):  # as_tensor(t) keeps t's
            site = pemae_caller()
            if site is not None:
                self.redirected.append(site)
                kwargs["device"] = "meta"
        return func(*args, **kwargs)
