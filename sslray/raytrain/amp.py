"""Mixed precision: the autocast dtype a run uses, and loss scaling when that dtype is float16.

``train.precision``:

* ``auto``: bf16 on a GPU that computes in bf16 natively (NVIDIA compute capability 8.0 and up:
  A100, A10, L4, H100, RTX 30xx/40xx), fp16 with loss scaling on older GPUs (V100, T4, RTX 20xx:
  bf16 is emulated there, several times slower than fp16), fp32 on CPU (CPU autocast is slower
  than fp32 on most hosts);
* ``bf16`` / ``fp16`` / ``fp32``: as named, on any device.

fp16 has 5 exponent bits: small gradients underflow to 0 and large ones overflow to inf. The loss
is therefore multiplied by a scale before backward and the gradients divided by it before the
optimizer (``torch.amp.GradScaler``). A step whose gradients overflow at the current scale is
skipped and the scale halved; the scale doubles again after 2,000 clean steps. Such a skip is the
scaler calibrating, not a fault: ``StepHealth`` counts it apart (``amp_overflow_frac``) and stops the
run only when gradients stay non-finite long after the scale fell below 1. Deciding whether to skip
costs the fp16 step one host sync (``GradScaler.step`` reads the overflow flag); bf16 and fp32 steps
have none.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..config import CHOICES

PRECISIONS = CHOICES["train.precision"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"config key 'train.precision': expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 in hardware (emulated bf16 counts as no)."""
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16``, ``fp16`` or ``fp32``: what ``precision`` means on ``device``."""
    if check_precision(precision) != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if native_bf16(device) else "fp16"


def autocast_for(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    p = resolve_precision(precision, device)
    return torch.autocast(device.type, dtype=DTYPES[p]) if p in DTYPES else nullcontext()


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled only when ``precision`` resolves to fp16 (otherwise every call is a
    pass-through: ``scale(loss)`` is ``loss``, ``step(opt)`` is ``opt.step()``)."""
    return torch.amp.GradScaler(device.type, enabled=resolve_precision(precision, device) == "fp16")


__all__ = ["PRECISIONS", "autocast_for", "check_precision", "grad_scaler", "native_bf16", "resolve_precision"]
