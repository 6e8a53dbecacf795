"""timm backbones that return pooled features (``num_classes=0``), with a small-image stem option."""

from __future__ import annotations

from typing import Callable

import timm
import torch
from torch import nn

from ..registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")
register_backbone = BACKBONES.register


def cifar_stem(model: nn.Module) -> nn.Module:
    """3x3 stride-1 first conv and no max-pool: keeps 32-px inputs at 32x32 into layer1 (SimCLR, appendix B.9).

    A deep stem (timm's ``resnet*d``/``resnet*t``: ``conv1`` is three 3x3 convs, the first of stride 2)
    keeps its three convs; its first one becomes stride 1."""
    if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
        raise ValueError(f"cifar_stem applies to ResNet-style models with conv1/maxpool, not {type(model).__name__}; "
                         "set model.cifar_stem=false")
    if isinstance(model.conv1, nn.Sequential) and isinstance(model.conv1[0], nn.Conv2d):
        first = model.conv1[0]
        model.conv1[0] = nn.Conv2d(first.in_channels, first.out_channels, 3, 1, 1, bias=False)
    elif isinstance(model.conv1, nn.Conv2d):
        old = model.conv1
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
    else:
        raise ValueError(f"cifar_stem: {type(model).__name__}'s conv1 is a {type(model.conv1).__name__}, neither a "
                         "conv nor a deep stem starting with one; set model.cifar_stem=false")
    model.maxpool = nn.Identity()
    return model


def create_backbone(name: str, *, cifar_stem_: bool = False, img_size: int | None = None, **kw) -> nn.Module:
    """A registered builder when one exists, otherwise any timm model name. ``model.num_features`` is
    the feature width."""
    if name in BACKBONES:
        return BACKBONES.get(name)(cifar_stem_=cifar_stem_, img_size=img_size, **kw)
    # Models with a fixed input size (ViT, DeiT, BEiT, EVA, Swin, CaiT...) are built at the crop size;
    # the others (ResNets, ConvNeXts, FastViT) take no img_size and any size as they are.
    extra = {"img_size": img_size} if img_size else {}
    try:
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, **extra, **kw)
        except TypeError as e:  # no img_size argument: built as it is
            if not extra or "img_size" not in str(e):
                raise
            model = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"backbone {name!r}: {e}") from None
    if cifar_stem_:
        cifar_stem(model)
    return model


def trunk_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that hold a timm backbone's compute, for a method that runs its parts itself
    (``forward_features``, the blocks) rather than calling it: a ViT's blocks, a ResNet's stages,
    a ConvNeXt-style ``stages``; the model itself when it has none of these."""
    for name in ("blocks", "stages"):
        seq = getattr(model, name, None)
        if isinstance(seq, nn.Sequential) and len(seq):
            return list(seq)
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    return [s for s in stages if isinstance(s, nn.Module)] or [model]


def feature_dim(model: nn.Module) -> int:
    return int(getattr(model, "num_features"))


@torch.no_grad()
def check_shapes(model: nn.Module, size: int) -> int:
    """Run one tiny forward to fail early with a clear message when the input size does not fit."""
    was = model.training
    model.eval()
    try:
        out = model(torch.zeros(2, 3, size, size))
    except Exception as e:
        raise ValueError(f"backbone {type(model).__name__} does not accept {size}x{size} inputs: {e}") from None
    finally:
        model.train(was)
    return out.shape[-1]
