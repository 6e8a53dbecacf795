"""Batched views on the device, with random parameters drawn per sample.

torchvision.transforms.v2 applied to a batch draws one set of parameters for the whole batch,
which weakens contrastive learning. Two backends draw per sample and run on whatever device the
batch is on: ``fused`` (default, ``FusedViewAugment``: a few batched kernels, parameters drawn on
the device) and ``kornia`` (``ViewAugment`` over kornia.augmentation, ``same_on_batch=False``).
``views.backend`` picks one; both take the same ``AugParams``.

A preset maps a method family to the list of views it needs: ``ViewSpec`` = list of
``(ViewAugment, count)``. Global crops come first, local (multi-crop) crops after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

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
        import kornia.augmentation as K  # only this backend needs kornia

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


# ITU-R 601 luma weights (what torchvision/kornia rgb_to_grayscale use).
_LUMA = (0.299, 0.587, 0.114)


class FusedViewAugment(nn.Module):
    """The same per-sample pipeline as ``ViewAugment`` in a few batched kernels, with every random
    parameter drawn on the batch's device (no host round trip, no per-sample Python):

    * crop + resize + flip: one ``affine_grid``/``grid_sample`` with a per-sample affine;
    * brightness, contrast, saturation, hue (a rotation about the grey axis) in a per-sample random order, then
      greyscale: composed into one 3x4 colour matrix per image and applied in one ``bmm``
      (as DALI's ColorTwist does); clamped to [0, 1] once, after the composition;
    * Gaussian blur: one grouped separable convolution with per-sample sigmas;
    * solarize and normalisation: elementwise.

    Written by hand because kornia.augmentation spends most of its time outside the kernels here
    (parameter sampling on the host, one op at a time, per-op host-device copies): see the
    ``fused`` vs ``kornia`` rows of benchmarks/loader.py and benchmarks/throughput.py in
    benchmarks/RESULTS.md. Differences from kornia, by design: bilinear resampling without
    antialiasing, one clamp after the colour composition instead of one per jitter op, and the
    hue shift as a rotation about the grey axis rather than an HSV round trip.

    ``last_params`` keeps the parameters of the last call (crop boxes in input pixels, flips,
    jitter factors, blur sigmas, ...) for inspection and tests.
    """

    def __init__(self, p: AugParams):
        super().__init__()
        self.params = p
        self.policy = PolicyOps(p.policies) if p.policies else None
        self.blur_k = max(3, int(0.1 * p.size) // 2 * 2 + 1)  # same kernel size as the kornia path
        self.register_buffer("mean", torch.tensor(p.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(p.std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor(_LUMA), persistent=False)
        k = 1 / math.sqrt(3)
        self.register_buffer("kk", torch.full((3, 3), k * k), persistent=False)
        self.register_buffer("cross_k", torch.tensor([[0, -k, k], [k, 0, -k], [-k, k, 0]]), persistent=False)
        self.last_params: dict = {}
        self._row_p: dict = {}

    # -- parameters ------------------------------------------------------------------------------
    def _boxes(self, B: int, H: int, W: int, dev) -> tuple[torch.Tensor, ...]:
        """torchvision's RandomResizedCrop draw, vectorised: 10 tries per sample, the first that fits
        wins; samples with none fall back to the whole image."""
        p, tries = self.params, 10
        area = H * W * torch.empty(B, tries, device=dev).uniform_(*p.scale)
        logr = torch.empty(B, tries, device=dev).uniform_(math.log(p.ratio[0]), math.log(p.ratio[1]))
        r = logr.exp()
        w, h = (area * r).sqrt(), (area / r).sqrt()
        ok = (w <= W) & (h <= H)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((B,), -1, device=dev))
        pick = first.clamp(min=0).unsqueeze(1)
        w = torch.where(first >= 0, w.gather(1, pick).squeeze(1), torch.full((B,), float(W), device=dev))
        h = torch.where(first >= 0, h.gather(1, pick).squeeze(1), torch.full((B,), float(H), device=dev))
        x0 = torch.rand(B, device=dev) * (W - w)
        y0 = torch.rand(B, device=dev) * (H - h)
        return x0, y0, w, h

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, h, w) float in [0, 1] -> jitter (p) and greyscale (p) as one affine per image."""
        p, B, dev = self.params, x.shape[0], x.device
        eye = torch.eye(3, device=dev).expand(B, 3, 3)
        A, o = eye.clone(), torch.zeros(B, 3, device=dev)
        luma = self.luma
        jit = p.jitter_p > 0 and any(p.jitter)
        if jit:
            bj, cj, sj, hj = p.jitter
            on = self._draw("jitter_p", B, dev)

            def factor(j):
                f = torch.empty(B, device=dev).uniform_(max(0.0, 1 - j), 1 + j)
                return torch.where(on, f, torch.ones_like(f))

            b, c, sat = factor(bj), factor(cj), factor(sj)
            hue = torch.where(on, torch.empty(B, device=dev).uniform_(-hj, hj), torch.zeros(B, device=dev))
            mu = x.mean(dim=(2, 3))  # per-image mean colour: contrast blends towards the current mean grey
            grey_mat = luma.view(1, 1, 3).expand(B, 3, 3)
            # hue: rotate colours about the grey axis (1,1,1)/sqrt(3) by 2*pi*hue, the linear map
            # closest to an HSV hue shift (Rodrigues' formula: cos I + sin [k]x + (1 - cos) k k^T)
            ang = 2 * math.pi * hue
            cos, sin = ang.cos().view(B, 1, 1), ang.sin().view(B, 1, 1)
            hue_mat = cos * eye + sin * self.cross_k + (1 - cos) * self.kk
            sat_mat = sat.view(B, 1, 1) * eye + (1 - sat).view(B, 1, 1) * grey_mat
            order = torch.rand(B, 4, device=dev).argsort(1)  # a random op order per image
            mats = torch.stack([b.view(B, 1, 1) * eye, c.view(B, 1, 1) * eye, sat_mat, hue_mat], 1)
            rows = torch.arange(B, device=dev)
            for k in range(4):
                idx = order[:, k]
                M = mats[rows, idx]
                # only contrast adds an offset: (1 - c) x the current mean grey, the same in all channels
                cur_mean_grey = ((A @ mu.unsqueeze(2)).squeeze(2) + o) @ luma  # (B,)
                off = torch.where(idx == 1, (1 - c) * cur_mean_grey, 0.0).unsqueeze(1)
                A, o = M @ A, (M @ o.unsqueeze(2)).squeeze(2) + off
            self.last_params.update(jitter_on=on, brightness=b, contrast=c, saturation=sat, hue=hue, order=order)
        if p.grey_p > 0:
            g = self._draw("grey_p", B, dev)
            G = torch.where(g.view(B, 1, 1), luma.view(1, 1, 3).expand(B, 3, 3), eye)
            A, o = G @ A, (G @ o.unsqueeze(2)).squeeze(2)
            self.last_params["grey"] = g
        if not jit and p.grey_p <= 0:
            return x
        h, w = x.shape[-2:]
        y = torch.baddbmm(o.unsqueeze(2), A, x.reshape(B, 3, h * w)).view(B, 3, h, w)
        return y.clamp_(0.0, 1.0)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        p, B, dev = self.params, x.shape[0], x.device
        on = self._draw("blur_p", B, dev)
        sigma = torch.empty(B, device=dev).uniform_(*p.blur_sigma)
        k = self.blur_k
        t = torch.arange(k, device=dev, dtype=x.dtype) - (k - 1) / 2
        ker = torch.exp(-(t.view(1, k) ** 2) / (2 * sigma.view(B, 1) ** 2))
        ker = ker / ker.sum(1, keepdim=True)
        delta = (t.abs() < 0.5).to(x.dtype).expand(B, k)
        self.last_params.update(blur_on=on, sigma=sigma)
        if dev.type == "cpu":
            # On the CPU the convolution dominates the whole pipeline, so blur only the selected images
            # (on a GPU that selection would cost a host sync; there the unselected get a delta kernel).
            idx = on.nonzero().view(-1)
            if idx.numel():
                x = x.clone()
                x[idx] = self._conv(x[idx], ker[idx])
            return x
        return self._conv(x, torch.where(on.view(B, 1), ker, delta))

    @torch.no_grad()
    def finish(self, x: torch.Tensor, row_p: Optional[dict] = None) -> torch.Tensor:
        """Only the steps after crop and colour (Gaussian blur, solarize, normalisation; per sample, as in
        ``forward``) on a float batch in [0, 1], for callers that crop the views themselves (VICRegL)."""
        self._row_p, self.last_params = row_p or {}, {}
        return self._finish(x)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        p, B = self.params, x.shape[0]
        if p.blur_p > 0:
            x = self._blur(x)
        if p.solarize_p > 0:
            s = self._draw("solarize_p", B, x.device)
            x = torch.where(s.view(B, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
            self.last_params["solarize"] = s
        return (x - self.mean) / self.std

    @staticmethod
    def _conv(x: torch.Tensor, ker: torch.Tensor) -> torch.Tensor:
        """Separable blur of each image with its own 1-D kernel: ``ker`` (B, k)."""
        B, C, H, W = x.shape
        k = ker.shape[1]
        ker = ker.repeat_interleave(C, 0)  # (B*C, k)
        y = x.reshape(1, B * C, H, W)
        pad = k // 2
        y = nn.functional.pad(y, (pad, pad, pad, pad), mode="reflect")
        y = nn.functional.conv2d(y, ker.view(B * C, 1, 1, k), groups=B * C)
        y = nn.functional.conv2d(y, ker.view(B * C, 1, k, 1), groups=B * C)
        return y.view(B, C, H, W)

    def _draw(self, name: str, n: int, dev) -> torch.Tensor:
        """Per-sample Bernoulli draws for probability ``name``: the row's own probability when the call
        passed ``row_p`` (views of several ``AugParams`` in one batch), else ``self.params``'."""
        p = self._row_p.get(name, getattr(self.params, name))
        return torch.rand(n, device=dev) < p

    @torch.no_grad()
    def forward(self, x: torch.Tensor, row_p: Optional[dict] = None) -> torch.Tensor:
        """``row_p`` maps names in ``PROB_FIELDS`` to per-row probabilities (a tensor of x's length);
        ``self.params`` must then hold the largest of each (a probability of 0 there skips the op)."""
        self._row_p = row_p or {}
        p = self.params
        B, _, H, W = x.shape
        dev = x.device
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        x0, y0, w, h = self._boxes(B, H, W, dev)
        flip = self._draw("hflip_p", B, dev)
        theta = torch.zeros(B, 2, 3, device=dev)
        theta[:, 0, 0] = (w / W) * torch.where(flip, -1.0, 1.0)
        theta[:, 0, 2] = (2 * x0 + w) / W - 1
        theta[:, 1, 1] = h / H
        theta[:, 1, 2] = (2 * y0 + h) / H - 1
        grid = nn.functional.affine_grid(theta, [B, 3, p.size, p.size], align_corners=False)
        x = nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        self.last_params = {"x0": x0, "y0": y0, "w": w, "h": h, "flip": flip}
        if self.policy is not None:
            x = self.policy(x)
        x = self._colour(x)
        return self._finish(x)


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


# The per-sample probabilities of AugParams; views whose params differ only in these can share one call.
PROB_FIELDS = ("hflip_p", "jitter_p", "grey_p", "blur_p", "solarize_p")


def batch_groups(params: Sequence[AugParams]) -> list[list[int]]:
    """Consecutive spec entries that differ at most in their probabilities (BYOL's asymmetric pair,
    DINO's two globals, n identical local crops are one entry): the indices of each group."""
    groups: list[list[int]] = []
    key = lambda p: replace(p, **{f: 0.0 for f in PROB_FIELDS})  # noqa: E731
    for i, p in enumerate(params):
        if groups and key(params[groups[-1][0]]) == key(p):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class MultiView(nn.Module):
    """A method's view spec: ``[(AugParams, count), ...]`` -> list of views (globals first).

    ``augs[i]`` is entry i's augmentation (``.params`` = its AugParams) and ``counts[i]`` its count.
    With the ``fused`` backend every group of ``batch_groups`` runs as one call on the batch repeated
    once per view, each row with its own entry's probabilities: parameters are still drawn per image
    and per view, but the ~150 small parameter kernels and the resample/colour/blur kernels run once
    per group instead of once per view (the step is launch-bound at small batch on a GPU).
    """

    def __init__(self, spec: Sequence[tuple[AugParams, int]], backend: str = "fused", group: bool = True):
        super().__init__()
        self.augs = nn.ModuleList(BACKENDS.get(backend)(p) for p, _ in spec)
        self.counts = [int(c) for _, c in spec]
        self.groups: list[list[int]] = []
        self.batched = nn.ModuleList()
        if backend == "fused" and group:  # group=False: one call per view (benchmarks/views.py compares)
            params = [p for p, _ in spec]
            for idx in batch_groups(params):
                merged = replace(params[idx[0]], **{f: max(getattr(params[i], f) for i in idx) for f in PROB_FIELDS})
                self.groups.append(idx)
                self.batched.append(FusedViewAugment(merged))
        self._row_p: dict = {}

    def _rows(self, g: int, b: int, dev) -> dict:
        """Per-row probabilities of group ``g`` for batch size ``b`` (cached: built once per size)."""
        key = (g, b, str(dev))
        if key not in self._row_p:
            rows = {}
            for f in PROB_FIELDS:
                vals = [float(getattr(self.augs[i].params, f)) for i in self.groups[g] for _ in range(self.counts[i])]
                if len(set(vals)) > 1:  # filled on the device: no host-to-device copy in the step
                    rows[f] = torch.cat([torch.full((b,), v, device=dev) for v in vals])
            self._row_p[key] = rows
        return self._row_p[key]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        views = []
        if not self.groups:
            for aug, count in zip(self.augs, self.counts):
                views.extend(aug(x) for _ in range(count))
            return views
        b = x.shape[0]
        for g, (idx, aug) in enumerate(zip(self.groups, self.batched)):
            n = sum(self.counts[i] for i in idx)
            if n == 1:
                views.append(aug(x))
                continue
            out = aug(x.repeat(n, 1, 1, 1), self._rows(g, b, x.device))
            views.extend(out.split(b))
        return views


BACKENDS: Registry[Callable[[AugParams], nn.Module]] = Registry("view backend")
BACKENDS.register("fused")(FusedViewAugment)
BACKENDS.register("kornia")(ViewAugment)

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


def local_crop_size(size: int) -> int:
    """96/224 of the global size, rounded to a multiple of 8 (224 -> 96, 32 -> 16, 64 -> 24), so
    ViT patch sizes 4, 8 and (at 224) 16 divide it."""
    return max(8, int(round(size * 96 / 224 / 8)) * 8)


@PRESETS.register("simclr")
def simclr_views(size=32, min_scale=0.08, jitter_strength=0.5, blur=False, n_local=0, local_size=None,
                 local_scale=(0.05, 0.14), **_):
    """SimCLR (Chen et al., 2020): two views from one distribution; blur off for 32-px data.

    ``n_local`` > 0 adds that many local crops (multi-crop, Caron et al. 2020, sec. 4) with the same
    photometric ops at ``local_size`` (default 96/224 of ``size``), scale ``local_scale`` (SwAV's
    (0.05, 0.14)): cheap extra positives, each ~1/4 of a global view's compute at 16 of 32 px."""
    base = _base(size, min_scale, jitter_strength, blur, size <= 64)
    spec = [(base, 2)]
    if n_local > 0:
        spec.append((replace(base, size=local_size or local_crop_size(size), scale=tuple(local_scale)), n_local))
    return spec


MULTICROP_PRESETS = ("dino", "swav", "simclr", "byol")  # presets that make local crops (views.local_crops)


def preset_spec(cfg) -> list:
    """The ``(AugParams, count)`` list the run's view preset makes (before its policy and overrides);
    ``cfg`` is the run's ``ViewConfig``."""
    extra = {}
    if getattr(cfg, "local_crops", -1) >= 0:
        extra["n_local"] = cfg.local_crops
    if getattr(cfg, "local_size", 0) > 0:
        extra["local_size"] = cfg.local_size
    if extra and cfg.preset not in MULTICROP_PRESETS:
        raise ValueError(f"config keys views.local_crops / views.local_size apply to the multi-crop presets "
                         f"({', '.join(MULTICROP_PRESETS)}), not views.preset={cfg.preset!r}")
    return PRESETS.get(cfg.preset)(
        size=cfg.crop_size, min_scale=cfg.min_scale, jitter_strength=cfg.jitter_strength, blur=cfg.blur, **extra
    )


def local_crop_count(cfg) -> int:
    """How many local crops the run's views make after the two global ones: ``views.local_crops``, or
    its preset's default when that is -1 (dino and swav: 6)."""
    return sum(n for _, n in preset_spec(cfg)) - 2


def build_views(cfg) -> MultiView:
    """``cfg`` is the run's ``ViewConfig``."""
    spec = preset_spec(cfg)
    from ..augconfig import apply_settings
    from .policies import apply_policy  # here: policies.py imports this module

    spec = apply_policy(spec, getattr(cfg, "policy", "default"), cfg)
    return MultiView(apply_settings(spec, cfg), getattr(cfg, "backend", "fused"))


def normalisation(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``views.mean`` / ``views.std`` when set, else CIFAR's for crops up to 64 px and ImageNet's above."""
    if getattr(cfg, "mean", ()):
        return tuple(cfg.mean), tuple(cfg.std)
    return (CIFAR_MEAN, CIFAR_STD) if cfg.crop_size <= 64 else (IMAGENET_MEAN, IMAGENET_STD)


def eval_transform(cfg) -> EvalTransform:
    """Probes, kNN, export: the training views' normalisation, so features see the same statistics."""
    return EvalTransform(cfg.crop_size, *normalisation(cfg))


__all__ = ["AugParams", "ViewAugment", "FusedViewAugment", "BACKENDS", "PROB_FIELDS", "batch_groups", "EvalTransform",
           "MultiView", "PRESETS", "build_views", "eval_transform", "local_crop_size", "normalisation", "replace",
           "simclr_views"]

from . import presets as _presets  # noqa: E402,F401  (registers the other presets)
