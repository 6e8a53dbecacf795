"""VICRegL (Bardes, Ponce & LeCun, NeurIPS 2022): VICReg on pooled embeddings plus VICReg on local
feature maps whose vectors are matched by image location and by feature distance;
``loss = alpha * global + (1 - alpha) * local``.

Location matching needs each view's crop box. The view preset ("vicregl") therefore applies only
the photometric augmentations to the whole image, and this method draws the random-resized crops
and flips itself (per sample), so every feature-map cell has known image coordinates. The Gaussian
blur and then solarize come after the crop, at network resolution, as in the paper's code: blurred
before, the blur would be magnified by the crop's resize (up to 3.5x at scale 0.08).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import roi_align

from ...datasets.presets import vicregl_tail
from ...datasets.views import AugParams, FusedViewAugment, replace
from ..backbones import trunk_modules
from ..distributed import gather_with_grad
from ..heads import MLPHead
from ..losses import local_vicreg_loss, nearest_by_feature, nearest_by_location, vicreg_loss
from . import register_method


def random_boxes(n: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), device=None) -> torch.Tensor:
    """RandomResizedCrop boxes ``(x0, y0, x1, y1)`` in [0, 1] image coordinates, one per sample."""
    area = torch.empty(n, device=device).uniform_(*scale)
    logr = torch.empty(n, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = torch.sqrt(area * logr.exp()).clamp(max=1.0)
    h = torch.sqrt(area / logr.exp()).clamp(max=1.0)
    x0 = torch.rand(n, device=device) * (1 - w)
    y0 = torch.rand(n, device=device) * (1 - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def crop_resize(imgs: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Cut ``boxes`` out of ``imgs`` (B, C, H, W), resize to ``size`` (bilinear), flip where ``flip``."""
    b, _, h, w = imgs.shape
    px = boxes * torch.tensor([w, h, w, h], device=imgs.device, dtype=boxes.dtype)
    rois = torch.cat([torch.arange(b, device=imgs.device, dtype=boxes.dtype)[:, None], px], 1)
    out = roi_align(imgs.float(), rois.to(imgs.dtype if imgs.is_floating_point() else torch.float32), (size, size),
                    spatial_scale=1.0, sampling_ratio=2, aligned=True).to(imgs.dtype)
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)


def cell_locations(boxes: torch.Tensor, flip: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Image coordinates (x, y) of every feature-map cell centre, (B, gh*gw, 2), row-major."""
    v = (torch.arange(gh, device=boxes.device, dtype=boxes.dtype) + 0.5) / gh
    u = (torch.arange(gw, device=boxes.device, dtype=boxes.dtype) + 0.5) / gw
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    uu, vv = uu.reshape(1, -1), vv.reshape(1, -1)
    uu = torch.where(flip.view(-1, 1), 1 - uu, uu)
    x = boxes[:, :1] + uu * (boxes[:, 2:3] - boxes[:, :1])
    y = boxes[:, 1:2] + vv * (boxes[:, 3:4] - boxes[:, 1:2])
    return torch.stack([x, y], -1)


def match_counts(num_matches) -> tuple[int, int]:
    """``num_matches`` as (view 1 -> view 2, view 2 -> view 1) pair counts; a single number is both."""
    counts = tuple(num_matches) if isinstance(num_matches, (list, tuple)) else (num_matches, num_matches)
    if len(counts) != 2 or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in counts):
        raise ValueError(f"method.params.num_matches: expected a positive int or two of them (location matches "
                         f"view 1 -> 2, view 2 -> 1; the paper's code uses [20, 4]), got {num_matches!r}")
    return counts


def feature_map(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``forward_features`` -> (pooled (B, C), cells (B, h*w, C), grid (h, w)) for CNNs and ViTs."""
    f = backbone.forward_features(x)
    pooled = backbone.forward_head(f, pre_logits=True)
    if f.ndim == 4:  # CNN: (B, C, h, w)
        return pooled, f.flatten(2).transpose(1, 2), f.shape[-2:]
    prefix = getattr(backbone, "num_prefix_tokens", 0)
    cells = f[:, prefix:]
    g = int(round(math.sqrt(cells.shape[1])))
    return pooled, cells, (g, g)


class VICRegL(nn.Module):
    family = "non-contrastive"

    def __init__(self, backbone: nn.Module, projector: nn.Module, local_projector: nn.Module, alpha: float = 0.75,
                 num_matches=(20, 4), l2_all_matches: bool = True, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                 cov_coeff: float = 1.0, scale=(0.08, 1.0), tail: tuple[AugParams, AugParams] | None = None):
        super().__init__()
        self.backbone, self.projector, self.local_projector = backbone, projector, local_projector
        self.alpha = alpha
        self.num_matches, self.l2_all_matches = match_counts(num_matches), l2_all_matches
        self.coeffs = dict(sim_coeff=sim_coeff, std_coeff=std_coeff, cov_coeff=cov_coeff)
        self.scale = tuple(scale)
        # Per-view (view 1, view 2) blur and solarize of the crops, by the views' own steps, so kernel,
        # sigma and solarize draws are the preset's; one module holds the larger probability of each.
        tail = tail or (AugParams(), AugParams())
        self.tail_p = {k: tuple(float(getattr(v, k)) for v in tail) for k in ("blur_p", "solarize_p")}
        self.tail = FusedViewAugment(replace(tail[0], **{k: max(ps) for k, ps in self.tail_p.items()}))

    def compile_targets(self) -> list[nn.Module]:
        """``model.compile``: the backbone's stages or blocks (it runs ``forward_features``, never the
        backbone module itself, so compiling that would compile nothing)."""
        return trunk_modules(self.backbone)

    def _finish(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Blur, then solarize the 2n crops, each view's rows with their own probabilities. The crops
        arrive normalised (the crop's resize is linear, so it commutes with the normalisation); they
        are un-normalised for these steps, since solarize thresholds pixel values, and normalised again."""
        rows = {k: torch.cat([torch.full((n,), p, device=x.device) for p in ps]) for k, ps in self.tail_p.items()}
        with torch.autocast(x.device.type, enabled=False):
            return self.tail.finish(x.float() * self.tail.std + self.tail.mean, rows).to(x.dtype)

    def forward(self, views):
        if len(views) != 2:
            raise ValueError(f"VICRegL takes exactly 2 views, got {len(views)}")
        n, size = views[0].shape[0], views[0].shape[-1]
        boxes = [random_boxes(n, self.scale, device=v.device) for v in views]
        flips = [torch.rand(n, device=v.device) < 0.5 for v in views]
        x = torch.cat([crop_resize(v, b, f, size) for v, b, f in zip(views, boxes, flips)], 0)
        if any(max(ps) > 0 for ps in self.tail_p.values()):
            x = self._finish(x, n)
        pooled, cells, (gh, gw) = feature_map(self.backbone, x)
        z = self.projector(pooled)
        loc = self.local_projector(cells.reshape(-1, cells.shape[-1])).reshape(2 * n, gh * gw, -1)
        # Global term over the global batch (gathered with gradients, as VICReg), the two views'
        # covariance terms averaged as the paper's code does. The matchings are per image, on each rank;
        # the local variance and covariance are statistics of the global batch at each match position.
        global_loss = vicreg_loss(gather_with_grad(z[:n]), gather_with_grad(z[n:]), **self.coeffs, cov_views="mean")
        l1, l2 = loc[:n], loc[n:]
        p1, p2 = (cell_locations(b, f, gh, gw) for b, f in zip(boxes, flips))
        k12, k21 = self.num_matches  # counts above gh*gw are clamped to it by the matchers
        f12, f21 = (gh * gw, gh * gw) if self.l2_all_matches else self.num_matches
        pairs = [nearest_by_location(l1, l2, p1, p2, k12), nearest_by_location(l2, l1, p2, p1, k21),
                 nearest_by_feature(l1, l2, f12), nearest_by_feature(l2, l1, f21)]
        local_loss = sum(local_vicreg_loss(gather_with_grad(a.reshape(n, -1, a.shape[-1])),
                                           gather_with_grad(b.reshape(n, -1, b.shape[-1])), **self.coeffs)
                         for a, b in pairs) / len(pairs)
        return {"loss": self.alpha * global_loss + (1 - self.alpha) * local_loss}


@register_method("vicregl")
def build_vicregl(cfg, backbone, feat_dim, alpha: float = 0.75, num_matches=(20, 4), l2_all_matches: bool = True,
                  sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0, local_hidden_dim: int = 0,
                  local_out_dim: int = 0, proj_layers: int = 3):
    """Global expander as VICReg; the local projector is an MLP applied to every cell (512-512-512 for
    ResNet-50 in the paper's code; ``local_hidden_dim`` / ``local_out_dim`` 0 = the global sizes).
    alpha 0.75; crops from ``views.min_scale``.

    Matching as the paper's code (``main_vicregl.py``: ``--num_matches 20 4``, ``--l2_all_matches 1``):
    ``num_matches`` pairs kept by location, view 1 -> 2 then view 2 -> 1 (a single number: the same
    for both); ``l2_all_matches`` matches every cell by feature distance, else ``num_matches`` too."""
    h, d = cfg.model.proj_hidden_dim, cfg.model.proj_out_dim
    projector = MLPHead(feat_dim, h, d, layers=proj_layers)
    local = MLPHead(feat_dim, local_hidden_dim or h, local_out_dim or d, layers=proj_layers)
    return VICRegL(backbone, projector, local, alpha, num_matches, l2_all_matches, sim_coeff, std_coeff, cov_coeff,
                   (cfg.views.min_scale, 1.0), vicregl_tail(cfg.views.crop_size, cfg.views.blur))


build_vicregl.family = VICRegL.family
build_vicregl.default_views = "vicregl"
