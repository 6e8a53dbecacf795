"""Losses in float32 inside a bf16 autocast region.

The training step runs under ``torch.autocast(bfloat16)``, which casts every matmul's inputs to bf16
even after an explicit ``.float()``. For the similarity and correlation matrices of the losses that
is ~3 significant digits: at SimCLR's T=0.1 the NT-Xent value itself came out rounded to bf16 (0.4%
off on the same inputs). These matrices are small (batch x batch, or dim x dim), so computing them
in float32 costs little next to the backbone.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch


def _device_type(args, kwargs) -> Optional[str]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device.type
    return None


def full_precision(fn: Callable) -> Callable:
    """Run ``fn`` with autocast turned off on its tensors' device (they are cast to float32 inside)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = _device_type(args, kwargs)
        if dev is None or not torch.is_autocast_enabled(dev):
            return fn(*args, **kwargs)
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
