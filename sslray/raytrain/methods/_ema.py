"""Momentum (EMA) teachers shared by MoCo v2/v3, BYOL, DINO and I-JEPA."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ...config import ConfigError
from ..optim import cosine_momentum


class EMATeacher(nn.Module):
    """A gradient-free copy of the student modules (e.g. backbone, projector), applied in sequence and
    updated as ``t <- m t + (1 - m) s`` (MoCo eq. 2, BYOL sec. 3.1).

    A registered submodule, so ``state_dict()`` saves and restores it with the student. Buffers
    (BN running statistics) are copied from the student rather than averaged, and so are the
    student's frozen parameters (``requires_grad`` False: MoCo v3's fixed position embedding and
    random patch projection): ``m t + (1 - m) t`` drifts from ``t`` by rounding, step after step.
    """

    def __init__(self, *students: nn.Module):
        super().__init__()
        self.module = nn.Sequential(*(copy.deepcopy(s) for s in students))
        self.module.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x)

    @torch.no_grad()
    def update(self, *students: nn.Module, momentum: float) -> None:
        student = nn.ModuleList(students)
        t_all, s_all = list(self.module.parameters()), list(student.parameters())
        if len(t_all) != len(s_all):
            raise RuntimeError("EMATeacher: student and teacher no longer have the same parameters")
        trained = [(t, s) for t, s in zip(t_all, s_all) if s.requires_grad]
        frozen = [(t, s) for t, s in zip(t_all, s_all) if not s.requires_grad]
        if frozen:
            torch._foreach_copy_([t for t, _ in frozen], [s for _, s in frozen])
        if trained:
            # foreach: one launch per few tensors instead of one per tensor (the step is launch-bound
            # at small batch); under no_grad the student parameters need no detach.
            t_params, s_params = [t for t, _ in trained], [s for _, s in trained]
            torch._foreach_mul_(t_params, momentum)
            torch._foreach_add_(t_params, s_params, alpha=1 - momentum)
        t_bufs, s_bufs = list(self.module.buffers()), list(student.buffers())
        if t_bufs:
            torch._foreach_copy_(t_bufs, s_bufs)


def ema_momentum(step: int, total: int, base: float, schedule: str = "cosine", end: float = 1.0) -> float:
    """``cosine``: base -> ``end`` over training (1 in BYOL, MoCo v3, DINO); ``linear``: base -> ``end``
    along a straight line (I-JEPA's 0.996 -> 1); ``constant``: base (MoCo v2). One function for the
    teachers' updates and the schedule picture."""
    if schedule == "cosine":
        return cosine_momentum(step, total, base, end)
    if schedule == "linear":
        return base + (end - base) * min(step, total) / max(1, total)
    if schedule == "constant":
        return base
    raise ValueError(f"momentum schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")


def check_momentum_end(base: float, end: float, schedule: str = "cosine") -> float:
    """``method.params.momentum_end``, the value the cosine schedule reaches at the end of training:
    finite, from the base ``method.params.momentum`` up to 1 (the schedule never lowers the momentum).
    A constant schedule has no end to set, so only the default 1 is taken there. Returns ``end``."""
    key = "config key 'method.params.momentum_end'"
    if not (math.isfinite(base) and math.isfinite(end) and base <= end <= 1):
        raise ConfigError(f"{key}: must be a finite number from method.params.momentum ({base!r}) to 1, got {end!r}")
    if schedule == "constant" and end != 1.0:
        raise ConfigError(f"{key}: the constant momentum schedule keeps method.params.momentum ({base!r}) "
                          f"throughout; set method.params.momentum_schedule=cosine to end at {end!r}")
    return end
