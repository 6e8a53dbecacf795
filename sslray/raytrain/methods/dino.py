"""DINO (Caron et al., ICCV 2021): a student matches an EMA teacher's centred, sharpened output across
multi-crop views. Teacher sees the global crops only; the centre is an EMA of the global-batch mean
(all-reduced); the teacher temperature warms up linearly; the last layer is frozen for the first epoch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_mean, gather_nograd, gather_with_grad
from ..losses import dino_loss, update_center
from . import register_method
from ._counters import add_counters, counter, set_counter
from ._ema import EMATeacher, check_momentum_end, ema_momentum
from ._multicrop import allow_any_size, encode_crops


class DINOHead(nn.Module):
    """3-layer MLP with GELU (no BN, as for ViTs) -> bottleneck -> L2-normalise -> weight-normalised
    linear layer to K outputs with its norm fixed to 1 (the paper's ``norm_last_layer=True``), or
    learned per output from 1 (``norm_last_layer=False``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, layers: int = 3,
                 norm_last_layer: bool = True):
        super().__init__()
        blocks: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(d, hidden_dim), nn.GELU()]
            d = hidden_dim
        blocks.append(nn.Linear(d, bottleneck_dim))
        self.mlp = nn.Sequential(*blocks)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        # norm_last_layer=False: each output's norm is learned, starting at 1 (weight norm's g; the
        # paper's README setting for ViT-S/16 at 300 epochs)
        self.last_scale = None if norm_last_layer else nn.Parameter(torch.ones(out_dim, 1))
        self.frozen = False  # set by the method; not state (derived from the step buffer)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        w = F.normalize(self.last_layer.weight, dim=1)
        if self.last_scale is not None:
            w = self.last_scale * w
        if self.frozen:
            w = w.detach() + 0 * w  # exactly-zero gradient; DDP still sees the parameter used
        return F.linear(x, w)


class DINO(nn.Module):
    family = "distillation"

    def __init__(self, backbone: nn.Module, head: DINOHead, out_dim: int, epochs: int, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 30,
                 center_momentum: float = 0.9, momentum: float = 0.996, freeze_last_layer_epochs: float = 1.0,
                 num_global: int = 2, momentum_end: float = 1.0):
        super().__init__()
        self.backbone, self.head = allow_any_size(backbone), head
        self.teacher = EMATeacher(self.backbone, head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        add_counters(self, "step", "total")
        self.epochs, self.student_temp, self.teacher_temp = max(1, epochs), student_temp, teacher_temp
        self.warmup_teacher_temp, self.warmup_epochs = warmup_teacher_temp, warmup_teacher_temp_epochs
        self.center_momentum, self.base_momentum, self.momentum_end = center_momentum, momentum, momentum_end
        self.freeze_last_layer_epochs, self.num_global = freeze_last_layer_epochs, num_global

    def epoch(self) -> float:
        """Fractional epoch of the current step (the loop's ``total`` spans all epochs)."""
        total = counter(self, "total")
        return 0.0 if total == 0 else counter(self, "step") * self.epochs / total

    def current_teacher_temp(self) -> float:
        e = self.epoch()
        if self.warmup_epochs > 0 and e < self.warmup_epochs:
            return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * e / self.warmup_epochs
        return self.teacher_temp

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The last layer during the first ``freeze_last_layer_epochs`` (the optimizer skips it then)."""
        last = [p for p in (self.head.last_layer.weight, self.head.last_scale) if p is not None]
        return last if self.epoch() < self.freeze_last_layer_epochs else []

    def forward(self, views):
        if len(views) < self.num_global or self.num_global < 1 or len(views) < 2:
            raise ValueError(f"DINO needs {self.num_global} global crops first and >= 2 views, got {len(views)}")
        self.head.frozen = self.training and self.epoch() < self.freeze_last_layer_epochs
        student = encode_crops(lambda x: self.head(self.backbone(x)), views)
        teacher = self.teacher(torch.cat(list(views[: self.num_global]), 0)).chunk(self.num_global, 0)
        # The global batch on every rank (gradients routed back by gather_with_grad), so the loss
        # equals the single-process one; the centre uses the all-reduced batch mean as in the paper.
        loss = dino_loss([gather_with_grad(s) for s in student], [gather_nograd(t) for t in teacher],
                         self.center, self.student_temp, self.current_teacher_temp())
        if self.training:
            batch_mean = all_reduce_mean(torch.cat(teacher).float().mean(0, keepdim=True))
            update_center(self.center, batch_mean, self.center_momentum)
        return {"loss": loss}

    def on_step(self, step: int, total: int) -> None:
        self.teacher.update(self.backbone, self.head,
                            momentum=ema_momentum(step, total, self.base_momentum, "cosine", self.momentum_end))
        set_counter(self, "step", step + 1)
        set_counter(self, "total", total)


@register_method("dino")
def build_dino(cfg, backbone, feat_dim, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
               teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 30,
               center_momentum: float = 0.9, momentum: float = 0.996, freeze_last_layer_epochs: float = 1.0,
               num_global: int = 2, norm_last_layer: bool = True, momentum_end: float = 1.0):
    """Paper defaults (ViT-S/16): K=65536, head 2048/256, student T=0.1 (``method.temperature``),
    teacher T 0.04 (warm-up from 0.04 over 30 epochs), centre momentum 0.9, teacher momentum 0.996
    to 1 (cosine, as the paper code's teacher schedule; ``momentum_end`` sets another end), last
    layer frozen for 1 epoch."""
    check_momentum_end(momentum, momentum_end)
    head = DINOHead(feat_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=norm_last_layer)
    return DINO(backbone, head, out_dim, cfg.train.epochs, cfg.method.temperature, teacher_temp, warmup_teacher_temp,
                warmup_teacher_temp_epochs, center_momentum, momentum, freeze_last_layer_epochs, num_global,
                momentum_end)


build_dino.family = DINO.family
build_dino.default_views = "dino"
build_dino.multicrop = True
