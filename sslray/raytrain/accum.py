"""Gradient accumulation (``train.accum_steps``): one optimizer step over ``k`` micro-batches.

The loop still runs one forward and backward per loader batch; ``Accumulator`` says where a window of
``k`` batches starts and ends, scales each micro-batch's loss by ``1/k`` (the summed gradients are then
those of the mean over the whole effective batch), keeps the step's mean loss for the health checks and
the metrics, suppresses DDP's per-backward all-reduce on all but the last micro-batch, and holds what
the online probe learns from until the step's health flag is known. With ``k = 1`` every call is the
plain step's own operation, so a run without accumulation computes exactly what it did before.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

# The loss terms that see the batch, not the sample, by method (BatchNorm anywhere is found apart).
COUPLED = {"simclr": "in-batch negatives", "mocov3": "in-batch negatives", "nnclr": "in-batch negatives",
           "barlowtwins": "the loss's batch statistics", "vicreg": "the loss's batch statistics",
           "vicregl": "the loss's batch statistics", "swav": "the Sinkhorn assignment over the batch",
           "dino": "the centre's batch mean"}


def coupling_note(model: nn.Module, method: str, k: int) -> Optional[str]:
    """One line for runs whose loss couples the samples of a batch (negatives, BatchNorm, batch
    statistics, Sinkhorn, centres): with accumulation those see one micro-batch, not the effective one."""
    if k <= 1:
        return None
    what = [COUPLED[method]] if method in COUPLED else []
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        what.append("BatchNorm statistics")
    if not what:
        return None
    return (f"note: train.accum_steps={k} keeps the effective batch's lr and schedule, but {' and '.join(what)} "
            "come from one micro-batch (data.batch_size), not from the effective batch")


class Accumulator:
    """Bookkeeping of one optimizer step made of ``k`` loader batches (``i``: the batch's index in the epoch)."""

    def __init__(self, k: int, probe_rows: int = 0):
        self.k = int(k)
        self.probe_rows = probe_rows  # images the probe encodes again per step (0 = all)
        self._losses: list[torch.Tensor] = []
        self._probe: list[tuple] = []

    def first(self, i: int) -> bool:
        return i % self.k == 0

    def last(self, i: int) -> bool:
        return i % self.k == self.k - 1

    def sync_context(self, net: nn.Module, i: int):
        """DDP all-reduces in every backward unless told not to: only the window's last one does."""
        no_sync = getattr(net, "no_sync", None)
        return no_sync() if no_sync is not None and not self.last(i) else nullcontext()

    def backward(self, loss: torch.Tensor, scaler, i: int, opt) -> None:
        """Gradients zeroed at the window's start, the micro-batch's share of the step's loss added."""
        if self.first(i):
            opt.zero_grad(set_to_none=True)
            self._losses, self._probe = [], []
        self._losses.append(loss.detach())
        scaler.scale(loss if self.k == 1 else loss / self.k).backward()

    def step_loss(self) -> torch.Tensor:
        """The step's loss: the mean of its micro-batches' (non-finite when any is)."""
        if self.k == 1:
            return self._losses[0]
        return torch.stack([v.float() for v in self._losses]).mean()

    def keep_probe(self, feats: Optional[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> None:
        """The micro-batch's probe input: its features, or its images to encode after the step. The
        loader may reuse its buffers for the next batches, so with k > 1 they are copied."""
        if self.k == 1:
            self._probe.append((feats, x, y))
            return
        if feats is None:
            # Encoded again after the step: at most probe_rows images, or one micro-batch's worth when
            # that is 0 (all of k micro-batches in one forward would bring back the peak k was set for).
            have = sum(len(p[2]) for p in self._probe)
            n = max(0, min(len(y), (self.probe_rows or len(y)) - have))
            x, y = x[:n], y[:n]
        self._probe.append((feats, None if feats is not None else x.clone(), y.clone()))

    def probe_batch(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
        """``(feats, x, y)`` of the whole step: features when every micro-batch had them, else images."""
        if self.k == 1:
            return self._probe[0]
        y = torch.cat([p[2] for p in self._probe])
        if all(p[0] is not None for p in self._probe):
            return torch.cat([p[0] for p in self._probe]), None, y
        return None, torch.cat([p[1] for p in self._probe]), y


def plan_steps(batches: int, k: int, cap: int = 0) -> tuple[int, Optional[str]]:
    """Optimizer steps per epoch of ``batches`` loader batches (at most ``cap`` when set) and, when
    batches are left over at the epoch's end, the line that says so."""
    if batches < k:
        raise ValueError(f"config key 'train.accum_steps' ({k}) is more than the {batches} batches of an epoch: "
                         "no optimizer step would be taken; lower it or data.batch_size")
    steps = batches // k
    if cap and cap < steps:
        return cap, None
    left = batches - steps * k
    if not left:
        return steps, None
    return steps, (f"train.accum_steps={k}: the epoch's {batches} batches make {steps} optimizer steps; the last "
                   f"{left} batch(es) of each epoch are not trained on")


__all__ = ["Accumulator", "coupling_note", "plan_steps"]
