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
    """Class scores ``(Nq, C)``: the top-k cosine neighbours vote with weight ``exp(sim / T)``."""
    q = F.normalize(query.float(), dim=1)
    b = F.normalize(bank.float(), dim=1)
    k = min(k, b.shape[0])
    out = []
    for i in range(0, q.shape[0], chunk):
        sim = q[i : i + chunk] @ b.t()
        w, idx = sim.topk(k, dim=1)
        w = (w / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], w)
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(query, query_labels, bank, bank_labels, num_classes, k=200, temperature=0.07) -> dict:
    scores = knn_predict(query, bank, bank_labels, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    y = query_labels.view(-1, 1)
    return {
        "knn_top1": float((top[:, :1] == y).any(1).float().mean()),
        "knn_top5": float((top == y).any(1).float().mean()),
    }
