"""Step counters that live in the checkpoint (0-d long buffers) and on the host at once.

Per-step decisions (DINO's frozen last layer and teacher-temperature warm-up, SwAV's frozen
prototypes and queue start, the queues' write pointer and fill count) read the Python mirror, so
they never wait on the device; the buffer is what ``state_dict`` saves, and loading a checkpoint
refreshes the mirror (one read, at load).
"""

from __future__ import annotations

import torch
from torch import nn


def add_counters(module: nn.Module, *names: str) -> None:
    """Register ``names`` as 0-d long buffers with host mirrors, read by ``counter(module, name)``."""
    for n in names:
        module.register_buffer(n, torch.zeros((), dtype=torch.long))
    module._host_counters = {n: 0 for n in names}

    def refresh(mod, _incompatible) -> None:
        mod._host_counters = {n: int(getattr(mod, n)) for n in mod._host_counters}

    module.register_load_state_dict_post_hook(refresh)


def set_counter(module: nn.Module, name: str, value: int) -> None:
    getattr(module, name).fill_(value)
    module._host_counters[name] = int(value)


def counter(module: nn.Module, name: str) -> int:
    return module._host_counters[name]
