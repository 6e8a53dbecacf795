"""Feature extraction and the weighted kNN classifier (Wu et al., 2018): the cheap per-epoch monitor."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .amp import autocast_for


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    batches: Iterable,
    transform: nn.Module,
    device: torch.device,
    precision: str = "auto",
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen pooled features (float32) and labels for every batch of ``(uint8 images, labels)``."""
    was = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for x, y in batches:
            x = transform(x.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_for(device, precision):
                f = backbone(x)
            feats.append(f.float())
            # FFCV reuses its output buffers for later batches: keep a copy, never a view.
            labels.append(y.to(device).long().view(-1).clone())
    finally:
        backbone.train(was)
    if not feats:
        raise ValueError("no batches to extract features from")
    return torch.cat(feats), torch.cat(labels)


def top5_k(num_classes: int) -> int:
    """The k of every "top-5" sslray reports (kNN, linear probe, online probe, fine-tuning): 5, and
    ``num_classes - 1`` with 6 classes or fewer (top-C is always 1.0), and 1 with two classes."""
    return max(1, min(5, num_classes - 1))


@torch.no_grad()
def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores ``(Nq, C)``: the top-k cosine neighbours vote with weight ``exp(sim / T)``, scaled per
    query by ``exp(-max sim / T)`` (the same ranking; without it float32 overflows to inf below T ~ 0.011
    and the classes tie). A class no neighbour voted for scores 0."""
    if k < 1 or not temperature > 0:
        raise ValueError(f"kNN needs k >= 1 and a temperature above 0, got k={k}, T={temperature}")
    q = F.normalize(query.float(), dim=1)
    b = F.normalize(bank.float(), dim=1)
    k = min(k, b.shape[0])
    out = []
    for i in range(0, q.shape[0], chunk):
        sim = q[i : i + chunk] @ b.t()
        w, idx = sim.topk(k, dim=1)
        w = ((w - w[:, :1]) / temperature).exp()  # topk is sorted: column 0 is each query's nearest
        votes = torch.zeros(sim.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], w)
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(query, query_labels, bank, bank_labels, num_classes, k=200, temperature=0.07) -> dict:
    """Top-1 and top-5 of the weighted kNN vote. A class counts in the top 5 only when a neighbour voted
    for it: with fewer than 5 classes among the k neighbours the rest of the top 5 would be zero-score
    classes picked by tie order, which credited queries whose class got no vote at all."""
    scores = knn_predict(query, bank, bank_labels, num_classes, k, temperature)
    top = scores.topk(top5_k(num_classes), dim=1)
    y = query_labels.view(-1, 1)
    hit = (top.indices == y) & (top.values > 0)
    return {
        "knn_top1": float(hit[:, :1].any(1).float().mean()),
        "knn_top5": float(hit.any(1).float().mean()),
    }
