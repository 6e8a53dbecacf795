"""NNCLR (Dwibedi et al., ICCV 2021): the positive of a view is the nearest neighbour of its
projection in a support-set queue; InfoNCE against the other view's predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import gather_nograd, gather_with_grad
from ..heads import MLPHead
from ..losses import infonce_loss
from . import register_method
from ._queue import FeatureQueue


class NNCLR(nn.Module):
    family = "contrastive"

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module, out_dim: int,
                 temperature: float = 0.1, queue_size: int = 98304):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        self.support = FeatureQueue(queue_size, out_dim)
        self.temperature = temperature

    def forward(self, views):
        if len(views) != 2:
            raise ValueError(f"NNCLR takes exactly 2 views, got {len(views)}")
        n = views[0].shape[0]
        z = self.projector(self.backbone(torch.cat(views, 0)))
        p = self.predictor(z)
        # Global batch on every rank: neighbours, negatives and the queue update all see every rank's
        # samples, and gather_with_grad routes the gradients back (see distributed.py).
        z1, z2 = gather_nograd(z[:n]), gather_nograd(z[n:])
        p1, p2 = gather_with_grad(p[:n]), gather_with_grad(p[n:])
        nn1, nn2 = self.support.nearest(z1), self.support.nearest(z2)
        loss = (infonce_loss(nn1, p2, None, self.temperature) + infonce_loss(nn2, p1, None, self.temperature)) / 2
        if self.training:
            self.support.push(F.normalize(z1.float(), dim=1))
        return {"loss": loss}


@register_method("nnclr")
def build_nnclr(cfg, backbone, feat_dim, queue_size: int = 98304, pred_hidden_dim: int = 4096):
    """Projector 3 layers (2048, 256, BN on the output), predictor 2 layers (4096, 256), T=0.1 (sec. 4.1)."""
    h, d = cfg.model.proj_hidden_dim, cfg.model.proj_out_dim
    projector = MLPHead(feat_dim, h, d, layers=3, last_bn=True)
    return NNCLR(backbone, projector, MLPHead(d, pred_hidden_dim, d, layers=2), d, cfg.method.temperature, queue_size)


build_nnclr.family = NNCLR.family
build_nnclr.default_views = "byol"
