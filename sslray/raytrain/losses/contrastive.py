"""Contrastive losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .precision import full_precision


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
    return multiview_nt_xent_loss([z1, z2], temperature)


@full_precision
def multiview_nt_xent_loss(zs: Sequence[torch.Tensor], temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent over V >= 2 views of the same N images (SimCLR with multi-crop, Caron et al. 2020,
    sec. 4; the multi-positive form of Khosla et al. 2020, eq. 2 "L_out", with the image as label).

    Each of the V*N embeddings is an anchor; its V-1 positives are the other views of its image, and
    every other embedding is in its denominator. The loss is -log p(positive) averaged over the
    anchor's positives, then over anchors. With V=2 this is exactly ``nt_xent_loss``.
    """
    if len(zs) < 2:
        raise ValueError(f"multiview_nt_xent_loss: needs at least 2 views, got {len(zs)}")
    for v, z in enumerate(zs[1:], 1):
        _check_pair(zs[0], z, f"multiview_nt_xent_loss (view 0 vs view {v})")
    n, nv = zs[0].shape[0], len(zs)
    z = F.normalize(torch.cat(list(zs), 0).float(), dim=1)
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))  # an embedding is never its own negative
    if nv == 2:  # one positive per anchor: plain cross-entropy (~20 fewer kernels per step than below)
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(logits, targets)
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    # Row a*N + i (view a, image i): its positives are columns b*N + i for every view b != a.
    row = torch.arange(nv * n, device=z.device)
    shift = torch.arange(1, nv, device=z.device)
    pos = ((row // n)[:, None] + shift[None, :]) % nv * n + (row % n)[:, None]
    return -log_p.gather(1, pos).mean()


@full_precision
def infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None, temperature: float = 0.2,
                 offset: int = 0, in_batch_negatives: bool = True) -> torch.Tensor:
    """InfoNCE (MoCo, He et al. 2020, eq. 1; MoCo v3, Chen et al. 2021, alg. 1; NNCLR, Dwibedi et al. 2021, eq. 2).

    Row ``i`` of ``q`` (N, D) is positive with row ``offset + i`` of ``k`` (M, D); every other row of
    ``k`` and every row of ``queue`` (K, D) is a negative. Inputs are L2-normalised here.
    MoCo v2: ``k`` = momentum keys of the same images, ``queue`` = past keys, T=0.2.
    MoCo v3 / NNCLR: ``k`` = the other view's keys of the whole batch, no queue (T 0.2 / 0.1).
    ``offset`` lets a rank's local queries address their slice of gathered keys.
    ``in_batch_negatives=False`` keeps only row ``offset + i`` of ``k`` for query ``i`` (MoCo v1/v2:
    negatives come from the queue alone).
    """
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"infonce_loss: expected q (N, D) and k (M, D) with the same D, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    if offset < 0 or offset + q.shape[0] > k.shape[0]:
        raise ValueError(f"infonce_loss: positives {offset}..{offset + q.shape[0]} fall outside k's {k.shape[0]} rows")
    if queue is not None and (queue.ndim != 2 or queue.shape[1] != q.shape[1]):
        raise ValueError(f"infonce_loss: queue must be (K, {q.shape[1]}), got {tuple(queue.shape)}")
    q = F.normalize(q.float(), dim=1)
    keys = F.normalize(k.float(), dim=1)
    if not in_batch_negatives:
        if queue is None:
            raise ValueError("infonce_loss: in_batch_negatives=False needs a queue of negatives")
        pos = (q * keys[offset : offset + q.shape[0]]).sum(1, keepdim=True)
        logits = torch.cat([pos, q @ F.normalize(queue.float(), dim=1).t()], 1) / temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
    if queue is not None:
        keys = torch.cat([keys, F.normalize(queue.float(), dim=1)], 0)
    logits = q @ keys.t() / temperature
    targets = torch.arange(offset, offset + q.shape[0], device=q.device)
    return F.cross_entropy(logits, targets)
