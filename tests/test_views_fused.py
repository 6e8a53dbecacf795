"""FusedViewAugment (the default view backend): the same per-sample contract as the kornia path,
plus parity with torchvision's functional ops where the fused maths is exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from sslray.config import ViewConfig
from sslray.datasets.views import AugParams, FusedViewAugment, build_views

ID = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
WHOLE = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))


def colourful(n: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def test_parameters_differ_across_the_batch():
    aug = FusedViewAugment(AugParams(size=32, jitter_p=1.0, blur_p=1.0))
    same = colourful(1).expand(64, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    out = aug(same)
    P = aug.last_params
    boxes = set(zip(*(P[k].tolist() for k in ("x0", "y0", "w", "h"))))
    assert len(boxes) == 64
    for k in ("brightness", "contrast", "saturation", "hue", "sigma"):
        assert P[k].unique().numel() == 64, k
    assert 0 < P["flip"].sum() < 64
    assert len({tuple(r) for r in P["order"].tolist()}) > 5  # the jitter order is drawn per image too
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(64) * 1e9).min() > 1e-3


# Crop area and aspect-ratio bounds: tests/test_views.py, parametrized over both backends.


def test_identity_flip_and_crop_are_exact_resamples():
    x = colourful(4)
    out = FusedViewAugment(AugParams(size=32, hflip_p=0, jitter_p=0, grey_p=0, **WHOLE, **ID))(x)
    torch.testing.assert_close(out, x.float() / 255, atol=1e-6, rtol=0)
    out = FusedViewAugment(AugParams(size=32, hflip_p=1, jitter_p=0, grey_p=0, **WHOLE, **ID))(x)
    torch.testing.assert_close(out, x.float().flip(-1) / 255, atol=1e-6, rtol=0)
    # a half-size output of the whole image is the 2x2 average (bilinear at pixel-centre midpoints)
    out = FusedViewAugment(AugParams(size=16, hflip_p=0, jitter_p=0, grey_p=0, **WHOLE, **ID))(x)
    torch.testing.assert_close(out, torch.nn.functional.avg_pool2d(x.float() / 255, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("which,fn", [(0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation)])
def test_single_jitter_ops_match_torchvision(which, fn):
    jitter = [0.0, 0.0, 0.0, 0.0]
    jitter[which] = 0.5
    aug = FusedViewAugment(AugParams(size=32, hflip_p=0, jitter=tuple(jitter), jitter_p=1.0, grey_p=0, **WHOLE, **ID))
    x = colourful(16)
    torch.manual_seed(3)
    out = aug(x)
    f = aug.last_params[("brightness", "contrast", "saturation")[which]]
    ref = torch.stack([fn(x[i].float() / 255, f[i].item()) for i in range(16)])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_hue_keeps_grey_and_luma_shift_small():
    aug = FusedViewAugment(AugParams(size=8, hflip_p=0, jitter=(0, 0, 0, 0.5), jitter_p=1.0, grey_p=0, **WHOLE, **ID))
    grey = torch.full((8, 3, 8, 8), 100, dtype=torch.uint8)
    torch.testing.assert_close(aug(grey), grey.float() / 255, atol=1e-5, rtol=0)  # grey has no hue
    x = (128 + 40 * torch.randn(256, 3, 8, 8)).clamp(0, 255).to(torch.uint8)
    out = aug(x)
    assert out.sub(x.float() / 255).abs().mean() > 0.01  # it changes colour
    # a rotation about the grey axis keeps each pixel's channel mean (up to the clamp at the gamut edge)
    assert out.mean(1).sub(x.float().div(255).mean(1)).abs().mean() < 2e-3


def test_greyscale_solarize_and_blur():
    x = colourful(64)
    g = FusedViewAugment(AugParams(size=32, hflip_p=0, jitter_p=0, grey_p=1.0, **WHOLE, **ID))(x)
    torch.testing.assert_close(g, TF.rgb_to_grayscale(x.float() / 255, num_output_channels=3), atol=2e-4, rtol=0)
    s = FusedViewAugment(AugParams(size=32, hflip_p=0, jitter_p=0, grey_p=0, solarize_p=1.0, **WHOLE, **ID))(x)
    xf = x.float() / 255
    torch.testing.assert_close(s, torch.where(xf >= 0.5, 1 - xf, xf))
    aug = FusedViewAugment(AugParams(size=32, hflip_p=0, jitter_p=0, grey_p=0, blur_p=1.0, **WHOLE, **ID))
    torch.manual_seed(4)
    b = aug(x)
    sig = aug.last_params["sigma"]
    k = aug.blur_k
    ref = torch.stack([TF.gaussian_blur(xf[i], [k, k], [sig[i].item()] * 2) for i in range(64)])
    torch.testing.assert_close(b, ref, atol=1e-4, rtol=0)
    assert b.std() < xf.std()


def test_seed_gives_determinism_and_default_backend_is_fused():
    aug = FusedViewAugment(AugParams(size=24, blur_p=0.5, solarize_p=0.2))
    x = colourful(16)
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(aug(x))
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    mv = build_views(ViewConfig())
    assert all(isinstance(a, FusedViewAugment) for a in mv.augs)
    assert all(type(a).__name__ == "ViewAugment" for a in build_views(ViewConfig(backend="kornia")).augs)


def test_jitter_statistics_are_sane():
    p = AugParams(size=32, hflip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grey_p=0.2, **WHOLE, **ID)
    aug = FusedViewAugment(p)
    n = 4000
    torch.manual_seed(2)
    out = aug(colourful(n))
    P = aug.last_params
    on = P["jitter_on"]
    assert abs(on.float().mean().item() - 0.8) < 0.04
    for k, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.6, 1.4), ("hue", -0.1, 0.1)):
        f = P[k][on]
        assert f.min() >= lo - 1e-6 and f.max() <= hi + 1e-6, k
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        assert abs(f.mean().item() - mid) < 0.06 * half, k
        assert abs(f.std().item() - half / 3 ** 0.5) < 0.1 * half, k
        assert (P[k][~on] == (0.0 if k == "hue" else 1.0)).all(), k
    assert out.min() >= 0 and out.max() <= 1
    grey = (out[:, 0] == out[:, 1]).all(-1).all(-1) & (out[:, 1] == out[:, 2]).all(-1).all(-1)
    assert abs(grey.float().mean().item() - 0.2) < 0.03
    assert abs(P["flip"].float().mean().item() - 0.5) < 0.04
    assert abs(out.mean().item() - colourful(n).float().div(255).mean().item()) < 0.03


def test_multicrop_count_and_size_come_from_the_config():
    import dataclasses

    cfg = ViewConfig(preset="dino", crop_size=64, local_crops=3, local_size=24)
    mv = build_views(cfg)
    assert sum(mv.counts) == 5
    sizes = [a.params.size for a, c in zip(mv.augs, mv.counts) for _ in range(c)]
    assert sizes.count(64) == 2 and sizes.count(24) == 3
    assert sum(build_views(dataclasses.replace(cfg, local_crops=0)).counts) == 2
    assert sum(build_views(ViewConfig(preset="swav", crop_size=64)).counts) == 8  # the preset's 6 locals
    with pytest.raises(ValueError, match="views.local_crops"):
        build_views(ViewConfig(preset="mocov3", local_crops=4))


def test_simclr_takes_local_crops_only_when_asked():
    """The simclr preset stays two views from one distribution by default (MoCo v2 shares it); with
    views.local_crops it adds local crops with the same photometric ops at 16 px, scale (0.05, 0.14)."""
    two = build_views(ViewConfig(preset="simclr"))
    assert two.counts == [2] and two.augs[0].params.scale == (0.08, 1.0)
    mv = build_views(ViewConfig(preset="simclr", local_crops=4))
    assert mv.counts == [2, 4]
    g, loc = mv.augs[0].params, mv.augs[1].params
    assert (loc.size, loc.scale) == (16, (0.05, 0.14))
    assert dataclasses.replace(loc, size=32, scale=g.scale) == g  # same jitter, grey, flip, blur, normalisation
    views = mv(colourful(6))
    assert [tuple(v.shape[-2:]) for v in views] == [(32, 32)] * 2 + [(16, 16)] * 4
    assert not torch.equal(views[2], views[3])  # each local crop draws its own parameters
    assert build_views(ViewConfig(preset="simclr", local_crops=2, local_size=24)).augs[1].params.size == 24


def test_views_of_one_group_share_a_call_with_each_rows_own_probabilities():
    """BYOL's pair differs only in probabilities (solarize 0 / 0.2, blur 1.0 / 0.1), so the fused
    MultiView makes both views in one call; each view's rows keep their own probabilities and every
    view of an image gets its own crop."""
    from sslray.datasets.presets import byol_views
    from sslray.datasets.views import MultiView, batch_groups

    spec = byol_views(size=16, blur=True)
    mv = MultiView(spec)
    assert batch_groups([p for p, _ in spec]) == [[0, 1]] and len(mv.batched) == 1
    n = 3000
    x = colourful(n, 16, 16)
    torch.manual_seed(0)
    v1, v2 = mv(x)
    assert v1.shape == v2.shape == (n, 3, 16, 16)
    P = mv.batched[0].last_params
    sol, blur = P["solarize"], P["blur_on"]
    assert not sol[:n].any() and abs(sol[n:].float().mean().item() - 0.2) < 0.03
    assert blur[:n].all() and abs(blur[n:].float().mean().item() - 0.1) < 0.03
    assert (P["x0"][:n] != P["x0"][n:]).float().mean() > 0.99  # view 1 and view 2 of an image: two crops
    assert abs(P["jitter_on"].float().mean().item() - 0.8) < 0.03  # shared probabilities stay as they were


def test_multicrop_groups_globals_and_locals_and_keeps_the_view_order():
    from sslray.datasets.presets import dino_views
    from sslray.datasets.views import MultiView

    spec = dino_views(size=32, n_local=4, local_size=16)
    mv = MultiView(spec)
    assert mv.groups == [[0, 1], [2]]  # two globals in one call, the 4 locals in another
    views = mv(colourful(8))
    assert [tuple(v.shape[-2:]) for v in views] == [(32, 32)] * 2 + [(16, 16)] * 4
    flat = torch.stack([v.flatten(1) for v in views[2:]])  # the four local crops of an image all differ
    assert all((flat[i] - flat[j]).abs().amax(1).min() > 0 for i in range(4) for j in range(i))
    kornia = MultiView(spec, backend="kornia")
    assert not kornia.groups and [tuple(v.shape) for v in kornia(colourful(8))] == [tuple(v.shape) for v in views]


@pytest.mark.gpu
def test_grouped_views_never_sync_the_host_on_cuda():
    """After the first call (which caches the per-row probabilities), making BYOL's asymmetric pair
    and DINO's multi-crop queues device work only: torch's sync debug mode turns a sync into an error."""
    from sslray.datasets.presets import byol_views, dino_views
    from sslray.datasets.views import MultiView

    dev = torch.device("cuda")
    x = colourful(64).to(dev)
    for spec in (byol_views(size=32, blur=True), dino_views(size=32, n_local=4, blur=True)):
        mv = MultiView(spec).to(dev)
        mv(x)
        torch.cuda.set_sync_debug_mode("error")
        try:
            views = mv(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(v.is_cuda and torch.isfinite(v).all() for v in views)


def _grey_axis_rotation(img: torch.Tensor, hue: float) -> torch.Tensor:
    """Rotate each pixel's colour about the grey axis (1, 1, 1) by 2*pi*hue (right-handed, so red turns
    towards green, like a positive HSV hue shift), built as the exponential of the axis' cross matrix."""
    k = 1 / 3 ** 0.5
    cross = torch.tensor([[0.0, -k, k], [k, 0.0, -k], [-k, k, 0.0]], dtype=torch.float64)
    rot = torch.linalg.matrix_exp(2 * torch.pi * hue * cross).float()
    return torch.einsum("ij,jhw->ihw", rot, img)


def _hsv_hue_deg(img: torch.Tensor) -> torch.Tensor:
    """(3, h, w) float RGB -> each pixel's HSV hue in degrees, by the standard library's colorsys."""
    import colorsys

    return torch.tensor([colorsys.rgb_to_hsv(*px)[0] * 360 for px in img.flatten(1).T.tolist()])


def test_jitter_composes_the_four_ops_in_each_images_own_order():
    """Catches the fused colour matrix ignoring the per-image op order (or composing it reversed)."""
    n = 64
    g = torch.Generator().manual_seed(1)
    # a tinted image per sample (so contrast and hue do not commute), every value in [0.3, 0.7]: with these
    # strengths no op leaves [0, 1], so torchvision's per-op clamps never act and the two must agree
    x = 0.4 + 0.2 * torch.rand(n, 3, 1, 1, generator=g) + 0.1 * (2 * torch.rand(n, 3, 16, 16, generator=g) - 1)
    p = AugParams(size=16, hflip_p=0, jitter=(0.3, 0.3, 0.5, 0.1), jitter_p=1.0, grey_p=0, **WHOLE, **ID)
    aug = FusedViewAugment(p)
    torch.manual_seed(5)
    out = aug(x)
    P = aug.last_params
    assert P["jitter_on"].all() and len({tuple(r) for r in P["order"].tolist()}) > 12

    def sequential(i: int, order) -> torch.Tensor:
        ops = (lambda im: TF.adjust_brightness(im, P["brightness"][i].item()),
               lambda im: TF.adjust_contrast(im, P["contrast"][i].item()),
               lambda im: TF.adjust_saturation(im, P["saturation"][i].item()),
               lambda im: _grey_axis_rotation(im, P["hue"][i].item()))
        im = x[i]
        for k in order:
            im = ops[k](im)
            assert 0 < im.min() and im.max() < 1  # no clamp anywhere in the reference
        return im

    ref = torch.stack([sequential(i, P["order"][i].tolist()) for i in range(n)])
    # 1e-4: torchvision's luma weights are (0.2989, 0.587, 0.114), the fused ones (0.299, 0.587, 0.114);
    # the largest difference seen (20 seeds) is ~6e-5. A wrong order costs up to ~2e-2 here.
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    fixed = torch.stack([sequential(i, range(4)) for i in range(n)])
    assert (fixed - ref).abs().amax() > 1e-2  # the data can tell the orders apart


def test_hue_is_a_grey_axis_rotation_of_2pi_hue_and_shifts_hsv_hue_by_hue_x_360():
    """Catches a wrong hue angle in the fused jitter (e.g. ``ang = hue`` instead of ``2*pi*hue``)."""
    # the six pure hues (red, yellow, green, cyan, blue, magenta) at HSV saturation 2/3, centred so that any
    # rotation about the grey axis stays inside [0, 1]: no clamp, and HSV hue is then a function of the
    # angle about the grey axis that departs from it by at most ~1.1 degrees
    pure = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]], dtype=torch.float)
    x = (0.25 + 0.5 * pure).T.reshape(1, 3, 1, 6).expand(32, 3, 6, 6).contiguous()
    aug = FusedViewAugment(AugParams(size=6, hflip_p=0, jitter=(0, 0, 0, 0.25), jitter_p=1.0, grey_p=0, **WHOLE, **ID))
    torch.manual_seed(0)
    out = aug(x)
    hue = aug.last_params["hue"]
    assert hue.abs().max() > 0.2
    ref = torch.stack([_grey_axis_rotation(x[i], hue[i].item()) for i in range(32)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for i in range(32):
        h = hue[i].item()
        got = _hsv_hue_deg(out[i])
        want = _hsv_hue_deg(x[i]) + 360 * h
        tv = _hsv_hue_deg(TF.adjust_hue(x[i], h))  # torchvision's HSV shift, for comparison
        for other in (want, tv):
            err = ((got - other + 180) % 360 - 180).abs().max().item()
            assert err < 2.0, (i, h, err)
