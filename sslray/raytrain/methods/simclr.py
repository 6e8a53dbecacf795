"""SimCLR (Chen et al., ICML 2020): two views, an MLP projector, NT-Xent over the global batch; with
``views.local_crops`` > 0, SimCLR with multi-crop (Caron et al. 2020, sec. 4): every view of an image
is a positive of every other."""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import gather_with_grad
from ..heads import MLPHead
from ..losses import multiview_nt_xent_loss, nt_xent_loss
from . import register_method
from ._multicrop import encode_crops, multicrop_backbone


class SimCLR(nn.Module):
    family = "contrastive"

    def __init__(self, backbone: nn.Module, feat_dim: int, temperature: float, hidden_dim: int, out_dim: int,
                 proj_layers: int = 2):
        super().__init__()
        self.backbone = backbone
        self.projector = MLPHead(feat_dim, hidden_dim, out_dim, layers=proj_layers)
        self.temperature = temperature

    def forward(self, views: list[torch.Tensor]) -> dict:
        if len(views) < 2:
            raise ValueError(f"SimCLR takes 2 views (or 2 global crops and local crops), got {len(views)}")
        # One backbone pass per crop size: the two views together (BN statistics over 2N images, as in
        # the paper), any local crops together. Negatives come from every rank; each rank computes the
        # global loss on the gathered embeddings and gather_with_grad routes the gradients back.
        zs = [gather_with_grad(z) for z in encode_crops(lambda x: self.projector(self.backbone(x)), views)]
        loss = nt_xent_loss(*zs, self.temperature) if len(zs) == 2 else multiview_nt_xent_loss(zs, self.temperature)
        return {"loss": loss}


@register_method("simclr")
def build_simclr(cfg, backbone, feat_dim, proj_layers: int = 2):
    backbone = multicrop_backbone(cfg, backbone)  # local crops are smaller: a ViT must take any size
    return SimCLR(backbone, feat_dim, cfg.method.temperature, cfg.model.proj_hidden_dim, cfg.model.proj_out_dim,
                  proj_layers)


build_simclr.family = SimCLR.family
build_simclr.default_views = "simclr"
build_simclr.multicrop = True
