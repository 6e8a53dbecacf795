"""Batched views on the device, with random parameters drawn per sample.

torchvision.transforms.v2 applied to a batch draws one set of parameters for the whole batch,
which weakens contrastive learning; kornia.augmentation draws per sample (``same_on_batch=False``)
and runs on whatever device the batch is on, so it is the library used here.

A preset maps a method family to the list of views it needs: ``ViewSpec`` = list of
``(ViewAugment, count)``. Global crops come first, local (multi-crop) crops after.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import kornia.augmentation as K
import torch
from torch import nn

from ..registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class AugParams:
    size: int = 32
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grey_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Named ops from sslray.datasets.policies.POLICIES (e.g. "lorot", "dcl"), applied in order after
    # crop + flip and before the colour ops, each on a float batch in [0, 1] with per-sample parameters.
    policies: tuple[str, ...] = ()


class ViewAugment(nn.Module):
    """uint8 NCHW batch -> one float view per image, normalised, each image with its own parameters."""

    def __init__(self, p: AugParams):
        super().__init__()
        self.params = p
        ops: list[nn.Module] = [
            # "resample" warps the whole batch in one call; the default "slice" loops per image.
            K.RandomResizedCrop((p.size, p.size), scale=p.scale, ratio=p.ratio, cropping_mode="resample"),
        ]
        if p.hflip_p > 0:
            ops.append(K.RandomHorizontalFlip(p=p.hflip_p))
        if p.policies:
            ops.append(PolicyOps(p.policies))
        if p.jitter_p > 0 and any(p.jitter):
            ops.append(K.ColorJitter(*p.jitter, p=p.jitter_p))
        if p.grey_p > 0:
            ops.append(K.RandomGrayscale(p=p.grey_p))
        if p.blur_p > 0:
            k = max(3, int(0.1 * p.size) // 2 * 2 + 1)  # ~10% of the crop, odd (SimCLR appendix A)
            ops.append(K.RandomGaussianBlur((k, k), p.blur_sigma, p=p.blur_p))
        if p.solarize_p > 0:
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=p.solarize_p))
        ops.append(K.Normalize(mean=torch.tensor(p.mean), std=torch.tensor(p.std)))
        self.ops = nn.Sequential(*ops)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return self.ops(x)


class PolicyOps(nn.Module):
    """The ``AugParams.policies`` ops, looked up by name in ``sslray.datasets.policies.POLICIES``."""

    def __init__(self, names: Sequence[str]):
        super().__init__()
        from .policies import POLICIES

        self.names = tuple(names)
        self.fns = [POLICIES.get(n) for n in self.names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            x = fn(x)
        return x


class EvalTransform(nn.Module):
    """Probes and kNN: the decoded centre square, resized to ``size`` when needed, normalised."""

    def __init__(self, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class MultiView(nn.Module):
    """A method's view spec: ``[(ViewAugment, count), ...]`` -> list of views (globals first)."""

    def __init__(self, spec: Sequence[tuple[AugParams, int]]):
        super().__init__()
        self.augs = nn.ModuleList(ViewAugment(p) for p, _ in spec)
        self.counts = [int(c) for _, c in spec]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        views = []
        for aug, count in zip(self.augs, self.counts):
            views.extend(aug(x) for _ in range(count))
        return views


PRESETS: Registry[Callable[..., list[tuple[AugParams, int]]]] = Registry("view preset")


def _base(size: int, min_scale: float, jitter_strength: float, blur: bool, small: bool) -> AugParams:
    s = jitter_strength
    return AugParams(
        size=size,
        scale=(min_scale, 1.0),
        jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
        blur_p=0.5 if blur else 0.0,
        mean=CIFAR_MEAN if small else IMAGENET_MEAN,
        std=CIFAR_STD if small else IMAGENET_STD,
    )


@PRESETS.register("simclr")
def simclr_views(size=32, min_scale=0.08, jitter_strength=0.5, blur=False, **_):
    """SimCLR (Chen et al., 2020): two views from one distribution; blur off for 32-px data."""
    return [(_base(size, min_scale, jitter_strength, blur, size <= 64), 2)]


def build_views(cfg) -> MultiView:
    """``cfg`` is the run's ``ViewConfig``."""
    spec = PRESETS.get(cfg.preset)(
        size=cfg.crop_size, min_scale=cfg.min_scale, jitter_strength=cfg.jitter_strength, blur=cfg.blur
    )
    return MultiView(spec)


def eval_transform(cfg) -> EvalTransform:
    small = cfg.crop_size <= 64
    return EvalTransform(cfg.crop_size, CIFAR_MEAN if small else IMAGENET_MEAN, CIFAR_STD if small else IMAGENET_STD)


__all__ = ["AugParams", "ViewAugment", "EvalTransform", "MultiView", "PRESETS", "build_views", "eval_transform", "replace"]

from . import presets as _presets  # noqa: E402,F401  (registers the other presets)
