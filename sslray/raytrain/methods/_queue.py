"""First-in-first-out embedding queues: MoCo v2's negatives, NNCLR's support set, SwAV's code queue."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._counters import add_counters, counter, set_counter


class FeatureQueue(nn.Module):
    """``size`` rows of ``dim`` features held in registered buffers (``state_dict`` round-trips them).

    ``init="random"`` starts full of random unit vectors (MoCo, NNCLR); ``init="empty"`` starts with
    no valid rows and :meth:`rows` returns only what has been pushed (SwAV).
    Push gathered (global-batch) features so every rank keeps the same queue.
    """

    def __init__(self, size: int, dim: int, init: str = "random"):
        super().__init__()
        if size < 1:
            raise ValueError(f"FeatureQueue: size must be >= 1, got {size}")
        if init not in ("random", "empty"):
            raise ValueError(f"FeatureQueue: init must be 'random' or 'empty', got {init!r}")
        data = F.normalize(torch.randn(size, dim), dim=1) if init == "random" else torch.zeros(size, dim)
        self.register_buffer("queue", data)
        add_counters(self, "ptr", "count")  # host mirrors: pushing never waits on the device
        set_counter(self, "count", size if init == "random" else 0)

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    def rows(self) -> torch.Tensor:
        """The valid rows (all of them once the queue has filled)."""
        n = counter(self, "count")
        return self.queue if n == self.size else self.queue[:n]

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.queue.shape[1]:
            raise ValueError(f"FeatureQueue.push: expected (N, {self.queue.shape[1]}), got {tuple(x.shape)}")
        x = x.detach().to(self.queue.dtype)[-self.size:]
        n, p = x.shape[0], counter(self, "ptr")
        idx = (torch.arange(n, device=x.device) + p) % self.size
        self.queue[idx] = x
        set_counter(self, "ptr", (p + n) % self.size)
        set_counter(self, "count", min(self.size, counter(self, "count") + n))

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Each row of ``z``'s nearest neighbour in the queue by cosine similarity (NNCLR eq. 2)."""
        bank = self.rows()
        idx = (F.normalize(z.detach(), dim=1) @ F.normalize(bank, dim=1).t()).argmax(1)
        return bank[idx]
