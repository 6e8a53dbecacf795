"""Clustering losses: SwAV's swapped prediction with Sinkhorn-Knopp codes (Caron et al., NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .precision import full_precision


@full_precision
def prototype_scores(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``z @ prototypes.T`` (B, K) in float32 even under autocast: Sinkhorn exponentiates the scores
    divided by epsilon (0.05), so a bf16 score's rounding (~0.004) would be ~8% in its code."""
    return z.float() @ prototypes.float().t()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp codes (SwAV, sec. 3.1 and alg. 1): ``scores`` (B, K) prototype scores -> codes
    (B, K) whose rows (samples) each sum to 1 and whose columns (prototypes) each sum to B/K
    (equipartition; exact in the limit of ``iters``, 3 in the paper). ``epsilon`` 0.05 is the paper's.

    Run it on the scores of the *global* batch (gathered across ranks) so the equipartition
    constraint spans every rank, as the paper's distributed version does with all_reduce.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn: expected scores (B, K), got {tuple(scores.shape)}")
    if iters < 1:
        raise ValueError(f"sinkhorn: iters must be >= 1, got {iters}")
    q = scores.float() / epsilon
    q = torch.exp(q - q.max()).t()  # (K, B); shifting by the max avoids overflow and cancels out
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)  # every prototype gets total mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # every sample gets total mass 1/B
        q /= b
    return (q * b).t()


def swav_loss(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """Swapped prediction (SwAV, eq. 1-2): the code of crop ``i`` (one per entry of ``codes``, usually the
    two global crops) is predicted from every other crop ``v``'s scores with a softmax at ``temperature``
    (0.1 in the paper); the loss is the mean over all (i, v != i) pairs and samples."""
    if len(codes) < 1 or len(scores) < 2 or len(codes) > len(scores):
        raise ValueError(f"swav_loss: need >= 2 crops and 1..{len(scores)} codes, got {len(scores)} and {len(codes)}")
    ref = scores[0].shape
    for i, s in enumerate(scores):
        if s.ndim != 2 or s.shape != ref:
            raise ValueError(f"swav_loss: every crop's scores must be {tuple(ref)} (B, K), crop {i} is {tuple(s.shape)}")
    for i, q in enumerate(codes):
        if q.shape != ref:
            raise ValueError(f"swav_loss: codes {i} is {tuple(q.shape)}, expected {tuple(ref)}")
    total, terms = 0.0, 0
    for i, q in enumerate(codes):
        for v, s in enumerate(scores):
            if v == i:
                continue
            total = total - (q.detach() * F.log_softmax(s.float() / temperature, dim=1)).sum(1).mean()
            terms += 1
    return total / terms
