"""MoCo v2 (Chen et al. 2020, "Improved baselines") and MoCo v3 (Chen, Xie & He, ICCV 2021).

v2: momentum key encoder + a queue of past keys as negatives, constant momentum 0.999, T=0.2.
v3: no queue; a predictor on the query branch, symmetric InfoNCE whose negatives are the other
view's keys of the *global* batch, cosine momentum schedule from 0.99.
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import gather_nograd, gather_with_grad, rank, world_size
from ..heads import MLPHead
from ..losses import infonce_loss
from . import register_method
from ._ema import EMATeacher, check_momentum_end, ema_momentum
from ._posembed import fix_sincos_pos_embed
from ._queue import FeatureQueue


def _two_views(views, name):
    if len(views) != 2:
        raise ValueError(f"{name} takes exactly 2 views, got {len(views)}")
    return views


@torch.no_grad()
def shuffled_bn_forward(encode, x: torch.Tensor, groups: int) -> torch.Tensor:
    """MoCo's shuffling BN (sec. 3.3): keys are encoded in BN groups of a random permutation of the
    *global* batch and put back in order, so a query's BN statistics and its key's come from different
    images and BN cannot leak the positive.

    Across ranks the global key batch is gathered, permuted by rank 0's permutation (broadcast), each
    rank encodes its slice and the unshuffled keys come back for its own images (the paper's
    ``_batch_shuffle_ddp``). ``groups`` is the number of BN groups over the global batch (the paper's
    8 GPUs); each rank splits its slice into ``groups // world`` of them, so one process with 8 groups
    sees the same group sizes as 8 workers. Groups keep >= 2 images (BN needs two).
    """
    n, world = x.shape[0], world_size()
    x_all = gather_nograd(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    if world > 1:
        torch.distributed.broadcast(perm, 0)
    mine = slice(rank() * n, (rank() + 1) * n)
    k_mine = x_all[perm[mine]]
    per_rank = max(1, min(groups // world, n // 2))
    k = torch.cat([encode(c) for c in k_mine.chunk(per_rank)])
    return gather_nograd(k)[perm.argsort()[mine]]


class MoCoV2(nn.Module):
    family = "contrastive"

    def __init__(self, backbone: nn.Module, projector: nn.Module, out_dim: int, temperature: float = 0.2,
                 queue_size: int = 65536, momentum: float = 0.999, momentum_schedule: str = "constant",
                 shuffle_bn_groups: int = 8, momentum_end: float = 1.0):
        super().__init__()
        self.backbone, self.projector = backbone, projector
        self.key_encoder = EMATeacher(backbone, projector)
        self.queue = FeatureQueue(queue_size, out_dim)
        self.temperature, self.base_momentum, self.momentum_schedule = temperature, momentum, momentum_schedule
        self.momentum_end = momentum_end
        self.shuffle_bn_groups = shuffle_bn_groups

    def forward(self, views):
        x1, x2 = _two_views(views, "MoCo v2")
        q = self.projector(self.backbone(x1))
        if self.training and self.shuffle_bn_groups > 0:
            k = shuffled_bn_forward(self.key_encoder, x2, self.shuffle_bn_groups)
        else:
            k = self.key_encoder(x2).detach()
        # As in the paper: one query per image, its key as the only positive, the queue as negatives.
        loss = infonce_loss(q, k, self.queue.rows(), self.temperature, in_batch_negatives=False)
        if self.training:
            self.queue.push(gather_nograd(torch.nn.functional.normalize(k.float(), dim=1)))
        return {"loss": loss}

    def on_step(self, step: int, total: int) -> None:
        self.key_encoder.update(self.backbone, self.projector,
                                momentum=ema_momentum(step, total, self.base_momentum, self.momentum_schedule,
                                                      self.momentum_end))


class MoCoV3(nn.Module):
    family = "contrastive"

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module, temperature: float = 0.2,
                 momentum: float = 0.99, momentum_end: float = 1.0):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        self.momentum_encoder = EMATeacher(backbone, projector)
        self.temperature, self.base_momentum, self.momentum_end = temperature, momentum, momentum_end

    def _ctr(self, q, k):
        # Queries and keys of the whole global batch (keys carry no gradient): every rank computes
        # the global loss and gather_with_grad routes gradients back, so DDP equals one process.
        # Scaled by 2T as in the paper's code so the gradient scale does not depend on T.
        return infonce_loss(gather_with_grad(q), gather_nograd(k), None, self.temperature) * 2 * self.temperature

    def forward(self, views):
        x1, x2 = _two_views(views, "MoCo v3")
        n = x1.shape[0]
        q = self.predictor(self.projector(self.backbone(torch.cat([x1, x2]))))
        k = self.momentum_encoder(torch.cat([x1, x2])).detach()
        loss = self._ctr(q[:n], k[n:]) + self._ctr(q[n:], k[:n])
        return {"loss": loss}

    def on_step(self, step: int, total: int) -> None:
        m = ema_momentum(step, total, self.base_momentum, "cosine", self.momentum_end)
        self.momentum_encoder.update(self.backbone, self.projector, momentum=m)


@register_method("mocov2")
def build_mocov2(cfg, backbone, feat_dim, queue_size: int = 65536, momentum: float = 0.999,
                 momentum_schedule: str = "constant", shuffle_bn_groups: int = 8, momentum_end: float = 1.0):
    """Projector fc-ReLU-fc without BN, as in the MoCo v2 code; T from ``method.temperature``; keys
    through shuffling BN in 8 groups over the global batch (the paper's 8 GPUs; 0 turns it off).
    ``momentum_end``: where ``momentum_schedule=cosine`` ends (1 by default; the paper's constant
    schedule has no end to set)."""
    check_momentum_end(momentum, momentum_end, momentum_schedule)
    projector = nn.Sequential(nn.Linear(feat_dim, cfg.model.proj_hidden_dim), nn.ReLU(inplace=True),
                              nn.Linear(cfg.model.proj_hidden_dim, cfg.model.proj_out_dim))
    return MoCoV2(backbone, projector, cfg.model.proj_out_dim, cfg.method.temperature, queue_size, momentum,
                  momentum_schedule, shuffle_bn_groups, momentum_end)


@register_method("mocov3")
def build_mocov3(cfg, backbone, feat_dim, momentum: float = 0.99, pred_hidden_dim: int = 4096,
                 proj_layers: int = 3, pred_last_bn: bool = True, freeze_patch_embed: bool = False,
                 fixed_pos_embed: bool = False, momentum_end: float = 1.0):
    """Projector ending in BN, 2-layer predictor. The defaults are the paper code's ViT layout
    (``MoCo_ViT``: 3-layer projector, predictor ending in BN); its ResNet layout (``MoCo_ResNet``) is
    ``proj_layers=2, pred_last_bn=False``. No Linear has a bias, as in the paper code's ``_build_mlp``.
    ``freeze_patch_embed``: a ViT's patch projection stays at its random init (the paper's fix for
    training instability, sec. 4.2, ``--stop-grad-conv1``); the optimizer then leaves it out. A backbone
    without one (a ResNet given to the ViT recipe) has nothing to freeze, as the paper's ResNet runs.
    ``fixed_pos_embed``: a ViT's position embedding is the paper code's fixed 2-D sin-cos one, zero for
    the class token, not timm's learned one (``vits.py``, ``build_2d_sincos_position_embedding``); it is
    frozen, and the momentum encoder, copied from the backbone below, holds the same. A backbone without
    one (a ResNet) is left as it is. ``momentum_end``: the momentum encoder's cosine schedule goes from
    ``momentum`` to it (the paper: 0.99 -> 1)."""
    check_momentum_end(momentum, momentum_end)
    proj = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    if freeze_patch_embed and proj is not None:
        proj.requires_grad_(False)
    if fixed_pos_embed:
        fix_sincos_pos_embed(backbone)
    h, d = cfg.model.proj_hidden_dim, cfg.model.proj_out_dim
    projector = MLPHead(feat_dim, h, d, layers=proj_layers, last_bn=True)
    predictor = MLPHead(d, pred_hidden_dim, d, layers=2, last_bn=pred_last_bn, last_bias=False)
    return MoCoV3(backbone, projector, predictor, cfg.method.temperature, momentum, momentum_end)


build_mocov2.family = MoCoV2.family
build_mocov2.default_views = "simclr"
build_mocov3.family = MoCoV3.family
build_mocov3.default_views = "byol"
