"""Multi-crop helpers: run crops of each resolution in one pass, let timm ViTs take any crop size."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def allow_any_size(backbone: nn.Module) -> nn.Module:
    """Switch a timm VisionTransformer to dynamic image size (position embeddings resampled per input),
    as DINO does for its 96-px local crops. Other backbones (CNNs) already take any size."""
    from timm.layers import Format

    if hasattr(backbone, "patch_embed") and hasattr(backbone, "dynamic_img_size") and not backbone.dynamic_img_size:
        backbone.dynamic_img_size = True
        pe = backbone.patch_embed
        pe.strict_img_size = False
        pe.flatten = False
        pe.output_fmt = Format.NHWC
    return backbone


def multicrop_backbone(cfg, backbone: nn.Module) -> nn.Module:
    """``backbone`` made to take any size when the run's views include local crops, smaller than the
    global ones: ``views.local_crops``, or its preset's default when that is -1 (dino, swav: 6)."""
    from ...datasets.views import local_crop_count

    return allow_any_size(backbone) if local_crop_count(cfg.views) > 0 else backbone


def encode_crops(encode: Callable[[torch.Tensor], torch.Tensor], views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``encode`` every view, batching consecutive views of the same size together (DINO's
    MultiCropWrapper): one pass for the global crops, one for the local crops."""
    out: list[torch.Tensor] = []
    i = 0
    while i < len(views):
        j = i
        while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
            j += 1
        y = encode(torch.cat(list(views[i:j]), 0))
        out.extend(y.chunk(j - i, 0))
        i = j
    return out
