"""Redundancy-reduction methods: Barlow Twins (Zbontar et al., ICML 2021) and VICReg (Bardes et al.,
ICLR 2022). Backbone + expander + a loss on batch statistics, computed over the global batch. With
``views.local_crops`` > 0, multi-crop (Caron et al. 2020): each local crop is paired with each global
crop, and the global crops with each other; VICReg's variance and covariance are per view."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ...config import ConfigError
from ..distributed import gather_with_grad
from ..heads import MLPHead
from ..losses import multicrop_barlow_twins_loss, multicrop_vicreg_loss
from . import register_method
from ._multicrop import encode_crops, multicrop_backbone


class BatchStatTwins(nn.Module):
    family = "non-contrastive"

    def __init__(self, backbone: nn.Module, projector: nn.Module,
                 loss: Callable[[list[torch.Tensor]], torch.Tensor], name: str):
        super().__init__()
        self.backbone, self.projector, self.loss, self.name = backbone, projector, loss, name

    def forward(self, views):
        if len(views) < 2:
            raise ValueError(f"{self.name} takes 2 views (or 2 global crops and local crops), got {len(views)}")
        # One pass per crop size: the 2 global crops together (BN statistics over 2N images, as in the
        # papers), any local crops together. Cross-correlation / variance / covariance are statistics
        # of the global batch: each view is gathered with gradients so every rank computes the
        # single-process loss (see distributed.py).
        zs = encode_crops(lambda x: self.projector(self.backbone(x)), views)
        return {"loss": self.loss([gather_with_grad(z) for z in zs])}


@register_method("barlowtwins")
def build_barlowtwins(cfg, backbone, feat_dim, lambda_: float = 5e-3, proj_layers: int = 3,
                      scale_loss: float = 1.0):
    """Projector: 3 linear layers, BN+ReLU between (8192 wide in the paper); lambda 5e-3.
    ``scale_loss`` multiplies the loss: 1.0 is the paper's (ImageNet); solo-learn's CIFAR lr and LARS
    settings were tuned with 0.1. The logged ``loss`` is the scaled one, the value that is
    backpropagated (as solo-learn logs it), so runs with different scales differ in it by that factor."""
    if not (isinstance(scale_loss, (int, float)) and math.isfinite(scale_loss) and scale_loss > 0):
        raise ConfigError(f"config key 'method.params.scale_loss': must be a finite number above 0, "
                          f"got {scale_loss!r}")
    h, d = cfg.model.proj_hidden_dim, cfg.model.proj_out_dim
    return BatchStatTwins(multicrop_backbone(cfg, backbone), MLPHead(feat_dim, h, d, layers=proj_layers),
                          partial(multicrop_barlow_twins_loss, lambda_=lambda_, scale_loss=scale_loss), "Barlow Twins")


@register_method("vicreg")
def build_vicreg(cfg, backbone, feat_dim, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 proj_layers: int = 3):
    """Expander: 3 linear layers, BN+ReLU between (8192 wide in the paper); lambda=mu=25, nu=1."""
    h, d = cfg.model.proj_hidden_dim, cfg.model.proj_out_dim
    return BatchStatTwins(multicrop_backbone(cfg, backbone), MLPHead(feat_dim, h, d, layers=proj_layers),
                          partial(multicrop_vicreg_loss, sim_coeff=sim_coeff, std_coeff=std_coeff,
                                  cov_coeff=cov_coeff), "VICReg")



build_barlowtwins.family = build_vicreg.family = BatchStatTwins.family
build_barlowtwins.default_views = build_vicreg.default_views = "byol"
build_barlowtwins.multicrop = build_vicreg.multicrop = True
