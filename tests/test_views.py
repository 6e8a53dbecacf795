"""ViewAugment (kornia; the crop-bounds test covers the fused backend too): parameters drawn per sample, crops within bounds, seeded, sane statistics."""

from __future__ import annotations

import pytest
import torch

from sslray.datasets.views import AugParams, EvalTransform, FusedViewAugment, ViewAugment


def op(aug: ViewAugment, name: str):
    return next(m for m in aug.ops if type(m).__name__ == name)


def colourful(n: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def boxes(aug: ViewAugment) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    src = op(aug, "RandomResizedCrop")._params["src"]  # (B, 4, 2) corners, inclusive pixel coords
    x0, y0 = src[:, 0, 0], src[:, 0, 1]
    w, h = src[:, 2, 0] - x0 + 1, src[:, 2, 1] - y0 + 1
    return x0, y0, w, h


def test_parameters_differ_across_the_batch():
    aug = ViewAugment(AugParams(size=32, jitter_p=1.0, blur_p=1.0))
    same = colourful(1).expand(64, -1, -1, -1).contiguous()  # one image, 64 times
    torch.manual_seed(0)
    out = aug(same)
    x0, y0, w, h = boxes(aug)
    assert len(set(zip(x0.tolist(), y0.tolist(), w.tolist(), h.tolist()))) > 50
    jit = op(aug, "ColorJitter")._params
    for k in ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor"):
        assert jit[k].unique().numel() == 64, k
    assert op(aug, "RandomGaussianBlur")._params["sigma"].unique().numel() == 64
    flips = op(aug, "RandomHorizontalFlip")._params["batch_prob"]
    assert 0 < flips.float().sum() < 64
    # and so the 64 views of one image are 64 different images (never one set per batch)
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(64) * 1e9).min() > 1e-3


def crop_boxes(aug) -> tuple[torch.Tensor, ...]:
    """(x0, y0, w, h) of the last call's crops, in input pixels, for either view backend."""
    if isinstance(aug, FusedViewAugment):
        return tuple(aug.last_params[k] for k in ("x0", "y0", "w", "h"))
    return tuple(t.float() for t in boxes(aug))


@pytest.mark.parametrize("backend", [ViewAugment, FusedViewAugment])
@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.3, 0.6), (0.5, 2.0))])
def test_crop_area_and_aspect_ratio_stay_within_bounds(scale, ratio, backend):
    H, W = 96, 128
    aug = backend(AugParams(size=32, scale=scale, ratio=ratio, hflip_p=0, jitter_p=0, grey_p=0))
    torch.manual_seed(1)
    aug(colourful(2000, H, W))
    x0, y0, w, h = crop_boxes(aug)
    eps = 1e-4
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= W + eps).all() and (y0 + h <= H + eps).all()
    area, ar = w * h / (H * W), w / h
    tol = 2 * (1 / H + 1 / W)  # kornia rounds both sides to whole pixels
    fits = (area >= scale[0] - tol) & (area <= scale[1] + tol) & (ar >= ratio[0] * (1 - 4 / H)) & (ar <= ratio[1] * (1 + 4 / H))
    whole = (w >= W - 1) & (h >= H - 1)  # torchvision's fallback after 10 failed tries
    assert (fits | whole).all() and whole.float().mean() < 0.05
    # the draws fill the range rather than sit at one value
    assert area[fits].max() - area[fits].min() > 0.5 * (scale[1] - scale[0])
    assert ar.log().std() > 0.1


def test_the_seed_gives_determinism():
    aug = ViewAugment(AugParams(size=24, blur_p=0.5, solarize_p=0.2))
    x = colourful(16)
    torch.manual_seed(7)
    a = aug(x)
    torch.manual_seed(7)
    b = aug(x)
    torch.manual_seed(8)
    c = aug(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_jitter_statistics_are_sane():
    p = AugParams(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1),
                  jitter_p=0.8, grey_p=0.2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    aug = ViewAugment(p)
    n = 4000
    torch.manual_seed(2)
    out = aug(colourful(n))
    jit = op(aug, "ColorJitter")._params
    applied = jit["batch_prob"].bool()
    assert abs(applied.float().mean().item() - 0.8) < 0.04
    for k, lo, hi in (("brightness_factor", 0.6, 1.4), ("contrast_factor", 0.6, 1.4),
                      ("saturation_factor", 0.6, 1.4), ("hue_factor", -0.1, 0.1)):
        f = jit[k][applied]
        assert f.min() >= lo - 1e-6 and f.max() <= hi + 1e-6, k
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        assert abs(f.mean().item() - mid) < 0.06 * half, k  # uniform: centred (~6 sigma at n=3,200)
        assert abs(f.std().item() - half / 3 ** 0.5) < 0.1 * half, k  # uniform: std = half-width/sqrt(3)
    assert out.min() >= 0 and out.max() <= 1  # clamped to the image range (identity normalisation)
    grey = (out[:, 0] == out[:, 1]).all(-1).all(-1) & (out[:, 1] == out[:, 2]).all(-1).all(-1)
    assert abs(grey.float().mean().item() - 0.2) < 0.03
    assert abs(op(aug, "RandomHorizontalFlip")._params["batch_prob"].float().mean().item() - 0.5) < 0.04
    # brightness is centred on 1, so the mean intensity is roughly kept
    assert abs(out.mean().item() - colourful(n).float().div(255).mean().item()) < 0.03


def test_normalisation_and_eval_transform():
    x = colourful(8, 32, 32)
    p = AugParams(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0, jitter_p=0, grey_p=0)
    out = ViewAugment(p)(x)
    mean, std = torch.tensor(p.mean).view(1, 3, 1, 1), torch.tensor(p.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std, atol=1e-4, rtol=1e-4)
    ev = EvalTransform(32, p.mean, p.std)(x)
    torch.testing.assert_close(ev, out, atol=1e-4, rtol=1e-4)
    assert EvalTransform(16)(x).shape == (8, 3, 16, 16)
