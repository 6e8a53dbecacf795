"""SSL methods: registered builders that compose backbone + heads + loss (+ teacher / queue).

A method is an ``nn.Module`` with:
  ``backbone``            the encoder whose pooled features are probed,
  ``family``              contrastive | non-contrastive | clustering | distillation | MIM,
  ``forward(views)``      -> ``{"loss": tensor, ...scalar logs}``,
  optional ``on_step(step, total_steps)`` for momentum teachers and schedules.

Each registered builder carries ``.family`` and ``.default_views`` (the view preset its recipes name).
Shared pieces live in small helpers: ``_ema`` (momentum teachers), ``_queue`` (feature queues),
``_multicrop`` (multi-resolution crops).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from ...registry import Registry
from ..backbones import check_shapes, create_backbone

METHODS: Registry[Callable[..., nn.Module]] = Registry("method")
register_method = METHODS.register


def build_backbone(cfg) -> tuple[nn.Module, int]:
    bb = create_backbone(cfg.model.backbone, cifar_stem_=cfg.model.cifar_stem, img_size=cfg.views.crop_size)
    return bb, check_shapes(bb, cfg.views.crop_size)


def create_method(cfg) -> nn.Module:
    """Build the method named by ``cfg.method.name``; ``cfg.method.params`` must match its keyword args."""
    builder = METHODS.get(cfg.method.name)
    params = dict(cfg.method.params)
    allowed = set(inspect.signature(builder).parameters) - {"cfg", "backbone", "feat_dim"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join('method.params.' + k for k in unknown)} for method "
            f"{cfg.method.name!r}; it accepts: {', '.join(sorted(allowed)) or 'none'}"
        )
    backbone, feat_dim = build_backbone(cfg)
    model = builder(cfg=cfg, backbone=backbone, feat_dim=feat_dim, **params)
    if cfg.model.grad_checkpointing:  # on the backbone the method trains (MAE may have rebuilt it)
        bb = model.backbone
        if not hasattr(bb, "set_grad_checkpointing"):
            raise ValueError(f"config key 'model.grad_checkpointing': backbone {cfg.model.backbone!r} "
                             f"({type(bb).__name__}) has no set_grad_checkpointing")
        bb.set_grad_checkpointing(True)
    return model


from . import dino, mae, moco, nnclr, redundancy, siamese, simclr, swav, vicregl  # noqa: F401  (register)

__all__ = ["METHODS", "build_backbone", "create_method", "register_method"]
