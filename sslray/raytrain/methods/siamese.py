"""Predictor-based siamese methods: BYOL (Grill et al., NeurIPS 2020) and SimSiam (Chen & He, CVPR 2021).

Both predict one view's target projection from the other view; they differ only in the target:
an EMA copy of the online backbone + projector (BYOL) or the online network itself behind a
stop-gradient (SimSiam). So one class, composed with or without an :class:`EMATeacher`. BYOL also
takes local crops (multi-crop): the online network predicts, from every crop, the target of each
other global crop.
"""

from __future__ import annotations

import torch
from torch import nn

from ..heads import MLPHead
from ..losses import multicrop_cosine_loss, negative_cosine_similarity
from . import register_method
from ._ema import EMATeacher, check_momentum_end, ema_momentum
from ._multicrop import encode_crops, multicrop_backbone


class PredictorSiamese(nn.Module):
    family = "non-contrastive"

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module, ema_momentum: float | None,
                 momentum_end: float = 1.0):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        self.target = EMATeacher(backbone, projector) if ema_momentum is not None else None
        self.base_momentum, self.momentum_end = ema_momentum, momentum_end

    def forward(self, views):
        if self.target is not None and len(views) > 2:
            return self._multicrop(views)
        if len(views) != 2:
            takes = "2 views (or 2 global crops and local crops)" if self.target is not None else "exactly 2 views"
            raise ValueError(f"{type(self).__name__} takes {takes}, got {len(views)}")
        n = views[0].shape[0]
        x = torch.cat(views, 0)
        z = self.projector(self.backbone(x))
        p = self.predictor(z)
        # negative_cosine_similarity stops the gradient through its second argument.
        t = self.target(x) if self.target is not None else z
        loss = (negative_cosine_similarity(p[:n], t[n:]) + negative_cosine_similarity(p[n:], t[:n])) / 2
        if self.target is not None:
            # BYOL's symmetrised loss: 2 - 2 cos per direction, summed (eq. 2 plus its mirror).
            loss = 4 + 4 * loss
        return {"loss": loss}

    def _multicrop(self, views):
        # BYOL with multi-crop: every crop through the online network, one pass per crop size; the
        # target encodes the 2 global crops only, together (its BN statistics as in the 2-view step).
        ps = encode_crops(lambda x: self.predictor(self.projector(self.backbone(x))), views)
        ts = self.target(torch.cat(views[:2], 0)).chunk(2)
        # Mean over the (view, other global) pairs, times 4 as above: the 2-view loss's scale.
        return {"loss": 4 + 4 * multicrop_cosine_loss(ps, ts)}

    def on_step(self, step: int, total: int) -> None:
        if self.target is not None:
            self.target.update(self.backbone, self.projector,
                               momentum=ema_momentum(step, total, self.base_momentum, "cosine", self.momentum_end))


class BYOL(PredictorSiamese):
    pass


class SimSiam(PredictorSiamese):
    fix_pred_lr = True

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        """The predictor keeps the peak lr, no cosine decay (SimSiam sec. 4.2: "fix lr for predictor"
        gives better results); ``method.params.fix_pred_lr=false`` schedules it like the rest."""
        return list(self.predictor.parameters()) if self.fix_pred_lr else []


@register_method("byol")
def build_byol(cfg, backbone, feat_dim, momentum: float = 0.996, pred_hidden_dim: int = 4096,
               momentum_end: float = 1.0):
    """Projector and predictor: Linear-BN-ReLU-Linear, 4096 hidden, 256 out (sec. 3.3). Target momentum
    ``momentum`` -> ``momentum_end`` along a cosine (sec. 3.2: 0.996 -> 1). With local crops
    (``views.local_crops`` above 0), multi-crop (Caron et al. 2020): each crop's prediction against the
    target of each other global crop."""
    check_momentum_end(momentum, momentum_end)
    backbone = multicrop_backbone(cfg, backbone)  # local crops are smaller: a ViT must take any size
    h, d = cfg.model.proj_hidden_dim, cfg.model.proj_out_dim
    return BYOL(backbone, MLPHead(feat_dim, h, d, layers=2), MLPHead(d, pred_hidden_dim, d, layers=2), momentum,
                momentum_end)


@register_method("simsiam")
def build_simsiam(cfg, backbone, feat_dim, pred_hidden_dim: int = 512, proj_layers: int = 3, fix_pred_lr: bool = True):
    """Projector 3 layers with BN on the output (2 on CIFAR in the paper), predictor a 2-layer
    bottleneck (hidden = out/4) without BN on its output (sec. 4)."""
    h, d = cfg.model.proj_hidden_dim, cfg.model.proj_out_dim
    projector = MLPHead(feat_dim, h, d, layers=proj_layers, last_bn=True)
    model = SimSiam(backbone, projector, MLPHead(d, pred_hidden_dim, d, layers=2), None)
    model.fix_pred_lr = bool(fix_pred_lr)
    return model


build_byol.family = BYOL.family
build_byol.default_views = "byol"
build_byol.multicrop = True
build_simsiam.family = SimSiam.family
build_simsiam.default_views = "simclr"
