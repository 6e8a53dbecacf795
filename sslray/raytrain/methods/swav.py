"""SwAV (Caron et al., NeurIPS 2020): online codes from Sinkhorn-Knopp over the global batch (plus an
optional queue), swapped prediction across multi-crop views, prototypes frozen for the first iterations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import gather_with_grad
from ..heads import MLPHead
from ..losses import prototype_scores, sinkhorn, swav_loss
from . import register_method
from ._counters import add_counters, counter, set_counter
from ._multicrop import allow_any_size, encode_crops
from ._queue import FeatureQueue


class SwAV(nn.Module):
    family = "clustering"

    def __init__(self, backbone: nn.Module, projector: nn.Module, out_dim: int, num_prototypes: int = 3000,
                 temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iters: int = 3, num_global: int = 2,
                 queue_size: int = 0, queue_start_step: int = 0, freeze_prototypes_steps: int = 313):
        super().__init__()
        self.backbone, self.projector = allow_any_size(backbone), projector
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False)
        with torch.no_grad():  # on the unit sphere from the start, so the frozen window needs no re-projection
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        self.temperature, self.epsilon, self.iters, self.num_global = temperature, epsilon, sinkhorn_iters, num_global
        self.queue_start_step, self.freeze_prototypes_steps = queue_start_step, freeze_prototypes_steps
        # One queue of past global-crop embeddings per global crop, as in the paper's code.
        self.queues = nn.ModuleList(FeatureQueue(queue_size, out_dim, init="empty") for _ in range(num_global)) \
            if queue_size > 0 else None
        add_counters(self, "step")

    def frozen(self) -> bool:
        return counter(self, "step") < self.freeze_prototypes_steps

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The prototypes during the first ``freeze_prototypes_steps`` (the optimizer skips them then)."""
        return [self.prototypes.weight] if self.frozen() else []

    def _prototype_weight(self) -> torch.Tensor:
        w = self.prototypes.weight
        if self.frozen():
            # Frozen (paper: no prototype update in the first iterations): an exactly-zero gradient
            # keeps DDP's reducer happy where a detached weight would leave it waiting.
            return w.detach() + 0 * w
        return w

    def forward(self, views):
        if len(views) < max(2, self.num_global):  # 2 global crops alone: the paper's 2x224 row
            raise ValueError(f"SwAV needs at least {max(2, self.num_global)} views (global crops first), "
                             f"got {len(views)}")
        if self.training and not self.frozen():
            with torch.no_grad():  # prototypes live on the unit sphere (alg. 1); frozen ones already do
                self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        z = [F.normalize(c.float(), dim=1) for c in encode_crops(lambda x: self.projector(self.backbone(x)), views)]
        # The global batch on every rank: Sinkhorn's equipartition spans all ranks and the loss equals
        # the single-process loss (gather_with_grad routes gradients back, see distributed.py).
        z = [gather_with_grad(c) for c in z]
        w = self._prototype_weight()
        scores = [prototype_scores(c, w) for c in z]
        codes = []
        use_queue = self.queues is not None and counter(self, "step") >= self.queue_start_step
        for i in range(self.num_global):
            s = scores[i].detach()
            if use_queue and counter(self.queues[i], "count") > 0:  # the host mirror: no device sync
                s = torch.cat([s, prototype_scores(self.queues[i].rows(), w.detach())])
            codes.append(sinkhorn(s, self.epsilon, self.iters)[: scores[i].shape[0]])
        loss = swav_loss(scores, codes, self.temperature)
        if self.queues is not None and self.training:
            for i in range(self.num_global):
                self.queues[i].push(z[i].detach())
        return {"loss": loss}

    def on_step(self, step: int, total: int) -> None:
        set_counter(self, "step", step + 1)


@register_method("swav")
def build_swav(cfg, backbone, feat_dim, num_prototypes: int = 3000, epsilon: float = 0.05, sinkhorn_iters: int = 3,
               num_global: int = 2, queue_size: int = 0, queue_start_step: int = 0,
               freeze_prototypes_steps: int = 313):
    """Projector 2 layers (2048 hidden, 128 out), 3000 prototypes, T=0.1 (``method.temperature``),
    epsilon 0.05, 3 Sinkhorn iterations; queue off by default (the paper adds 3840 rows at batch 256
    from epoch 15); prototypes frozen for the first 313 iterations (one ImageNet epoch at 4096)."""
    h, d = cfg.model.proj_hidden_dim, cfg.model.proj_out_dim
    return SwAV(backbone, MLPHead(feat_dim, h, d, layers=2), d, num_prototypes, cfg.method.temperature, epsilon,
                sinkhorn_iters, num_global, queue_size, queue_start_step, freeze_prototypes_steps)


build_swav.family = SwAV.family
build_swav.default_views = "swav"
build_swav.multicrop = True
