"""EMA teachers: frozen copies of student modules, updated as θ_t <- m·θ_t + (1 - m)·θ_s."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMATeacher(nn.Module):
    """A no-grad, always-eval copy of some student modules (e.g. encoder, or encoder + head)."""

    def __init__(self, **students: nn.Module):
        super().__init__()
        self.parts = nn.ModuleDict({name: copy.deepcopy(m) for name, m in students.items()})
        self.parts.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "EMATeacher":
        """Teachers stay in eval mode whatever the student does."""
        return super().train(False)

    def __getitem__(self, name: str) -> nn.Module:
        return self.parts[name]

    @torch.no_grad()
    def update(self, momentum: float, **students: nn.Module) -> None:
        """θ_t <- m·θ_t + (1 - m)·θ_s for every parameter and floating buffer, fused."""
        if set(students) != set(self.parts):
            raise ValueError(f"teacher holds {sorted(self.parts)}, got students {sorted(students)}")
        mine, theirs = [], []
        for name, student in students.items():
            mine += [t for t in self.parts[name].parameters()]
            theirs += [s.detach() for s in student.parameters()]
            mine += [b for b in self.parts[name].buffers() if b.is_floating_point()]
            theirs += [b for b in student.buffers() if b.is_floating_point()]
        torch._foreach_lerp_(mine, theirs, 1.0 - momentum)
