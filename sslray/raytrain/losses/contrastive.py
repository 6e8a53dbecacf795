"""Contrastive losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(z1: torch.Tensor, z2: torch.Tensor, name: str) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"{name}: expected two (N, D) tensors of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"{name}: needs at least 2 samples per view, got {z1.shape[0]}")


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (SimCLR, Chen et al. 2020, eq. 1): for each of the 2N embeddings, cross-entropy of its
    positive against the other 2N-2 embeddings, averaged over all 2N anchors.

    ``temperature`` 0.5 is the paper's CIFAR-10 value (0.1 for ImageNet at large batch).
    """
    _check_pair(z1, z2, "nt_xent_loss")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], 0).float(), dim=1)
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))  # an embedding is never its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)
