"""SimCLR (Chen et al., ICML 2020): two views, an MLP projector, NT-Xent over the global batch."""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import gather_with_grad
from ..heads import MLPHead
from ..losses import nt_xent_loss
from . import register_method


class SimCLR(nn.Module):
    family = "contrastive"

    def __init__(self, backbone: nn.Module, feat_dim: int, temperature: float, hidden_dim: int, out_dim: int,
                 proj_layers: int = 2):
        super().__init__()
        self.backbone = backbone
        self.projector = MLPHead(feat_dim, hidden_dim, out_dim, layers=proj_layers)
        self.temperature = temperature

    def forward(self, views: list[torch.Tensor]) -> dict:
        if len(views) != 2:
            raise ValueError(f"SimCLR takes exactly 2 views, got {len(views)}")
        n = views[0].shape[0]
        # One backbone pass over both views keeps BN statistics over 2N images, as in the paper.
        z = self.projector(self.backbone(torch.cat(views, 0)))
        z1, z2 = z[:n], z[n:]
        # Negatives come from every rank; each rank computes the global loss on the gathered
        # embeddings and gather_with_grad routes the gradients back (see distributed.py).
        loss = nt_xent_loss(gather_with_grad(z1), gather_with_grad(z2), self.temperature)
        return {"loss": loss}


@register_method("simclr")
def build_simclr(cfg, backbone, feat_dim, proj_layers: int = 2):
    return SimCLR(backbone, feat_dim, cfg.method.temperature, cfg.model.proj_hidden_dim, cfg.model.proj_out_dim,
                  proj_layers)


build_simclr.family = SimCLR.family
build_simclr.default_views = "simclr"
