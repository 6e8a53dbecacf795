"""A process's random streams (torch, numpy, Python, its GPU's): saved in checkpoints, restored per rank
on resume, and derived from the seed, the rank and the step where a checkpoint holds none for a rank."""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch


def rng_state(device: Optional[torch.device] = None) -> dict:
    """This process's random streams; on a GPU, the generator of ``device`` only (the one it trains on).
    Ray shows each worker every GPU its group holds on the node, so the state of all visible devices
    would not fit a resume on another layout (fewer GPUs per node, another node type)."""
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(s: dict, device: Optional[torch.device] = None) -> None:
    torch.set_rng_state(s["torch"].cpu())
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    cuda = s.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        # Checkpoints of earlier versions hold every visible device's state: this device's index, where
        # the saved list has one (the layout matches), else the stream seeded at the start is kept.
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda.cpu(), device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of one rank's own random stream (its views, masks and crops) from global step ``step``."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def restore_rng(state: dict, rank: int, seed: int, device: Optional[torch.device] = None) -> None:
    """Put this rank's random streams back as the checkpoint left them: its own saved state when the
    checkpoint holds one per rank, else rank 0's (a one-process checkpoint), else a stream derived from
    the seed, the rank and the step (a run resumed on more workers than it saved). ``device``: the GPU
    this rank trains on, whose generator gets the saved GPU stream."""
    per_rank = state.get("rng_ranks") or []
    if rank < len(per_rank):
        set_rng_state(per_rank[rank], device)
    elif rank == 0:
        set_rng_state(state["rng"], device)
    else:
        seed_everything(rank_seed(seed, rank, int(state["step"])))
