"""VICRegL against the paper's code (facebookresearch/VICRegL): how many local pairs each matching keeps,
and where in the pipeline the Gaussian blur acts."""

from __future__ import annotations

import inspect

import pytest
import torch

from sslray.config import load_config
from sslray.datasets.views import replace
from sslray.raytrain.methods import METHODS, create_method
from sslray.raytrain.methods import vicregl as V

B = 2
# resnet10t downsamples 32x: 224 px -> a 7x7 map (ResNet-50's at 224 px), 128 px -> 4x4 (ResNet-18's on CIFAR).
TINY = {"model.backbone": "resnet10t", "model.cifar_stem": False, "model.proj_hidden_dim": 32,
        "model.proj_out_dim": 16, "method.params.local_hidden_dim": 16}


def _model(recipe: str, size: int, **params):
    cfg = load_config(recipe, {**TINY, "views.crop_size": size, **{f"method.params.{k}": v for k, v in params.items()}})
    torch.manual_seed(0)
    return create_method(cfg)


def _pairs_per_image(monkeypatch, model, size: int) -> dict[str, list[int]]:
    """Run one step, recording the matched rows per image of every location / feature matching."""
    seen: dict[str, list[int]] = {"location": [], "feature": []}

    def record(kind, fn):
        def wrapped(*args):
            a, b = fn(*args)
            seen[kind].append(a.shape[0] // B)
            return a, b
        return wrapped

    monkeypatch.setattr(V, "nearest_by_location", record("location", V.nearest_by_location))
    monkeypatch.setattr(V, "nearest_by_feature", record("feature", V.nearest_by_feature))
    views = [torch.randn(B, 3, size, size) for _ in range(2)]
    assert torch.isfinite(model(views)["loss"])
    return seen


def test_the_paper_codes_match_counts_are_the_defaults():
    params = inspect.signature(METHODS.get("vicregl")).parameters
    assert tuple(params["num_matches"].default) == (20, 4) and params["l2_all_matches"].default is True
    for recipe in ("vicregl_cifar10", "vicregl_imagenet"):
        p = load_config(recipe).method.params
        assert list(p["num_matches"]) == [20, 4] and p["l2_all_matches"] is True, recipe


@pytest.mark.parametrize("recipe,size,cells", [("vicregl_imagenet", 224, 49), ("vicregl_cifar10", 128, 16)])
def test_location_keeps_20_and_4_pairs_and_feature_matching_every_cell(monkeypatch, recipe, size, cells):
    """--num_matches 20 4 for the two location matchings (clamped to the map's cells) and
    --l2_all_matches 1: both feature matchings keep every cell."""
    seen = _pairs_per_image(monkeypatch, _model(recipe, size), size)
    assert seen == {"location": [min(20, cells), 4], "feature": [cells, cells]}


def test_without_l2_all_matches_feature_matching_keeps_num_matches(monkeypatch):
    seen = _pairs_per_image(monkeypatch, _model("vicregl_imagenet", 224, l2_all_matches=False), 224)
    assert seen == {"location": [20, 4], "feature": [20, 4]}


def test_a_single_num_matches_is_both_location_counts_and_bad_ones_raise(monkeypatch):
    seen = _pairs_per_image(monkeypatch, _model("vicregl_imagenet", 224, num_matches=8), 224)
    assert seen == {"location": [8, 8], "feature": [49, 49]}
    for bad in ([20, 4, 2], [20, 0], "20", 2.5, True):
        with pytest.raises(ValueError, match="num_matches"):
            V.match_counts(bad)


def _edge_widths(model, views, size: int, crop: float, monkeypatch) -> torch.Tensor:
    """10-90 % width in pixels of a vertical step edge in view 1 at the backbone's input, with every
    crop a ``crop``-wide square centred on the edge (magnified 1/crop times by the resize)."""
    seen = []
    feature_map = V.feature_map
    monkeypatch.setattr(V, "feature_map", lambda bb, x: seen.append(x.detach()) or feature_map(bb, x))
    box = torch.tensor([[0.5 - crop / 2, 0.4, 0.5 + crop / 2, 0.4 + crop]])
    monkeypatch.setattr(V, "random_boxes", lambda n, scale, device=None: box.expand(n, 4))
    n = views[0].shape[0]
    with torch.no_grad():
        model(views)
    prof = seen[-1][:n, 0].mean(1)  # (n, size): the edge's profile across columns
    prof = (prof - prof.amin(1, keepdim=True)) / (prof.amax(1, keepdim=True) - prof.amin(1, keepdim=True))
    return ((prof > 0.1) & (prof < 0.9)).sum(1)


def test_blur_acts_on_the_crop_at_network_resolution(monkeypatch):
    """The paper's code crops, then blurs the crop with sigma in U(0.1, 2) px. Blurring the whole image
    before a 5x crop-and-resize would widen the edge 5x (up to ~25 px instead of at most ~7)."""
    from sslray.datasets.views import build_views

    size, n, crop = 224, 8, 0.2
    img = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    img[..., size // 2:] = 255  # black | white: jitter (off here), grey and normalisation keep it a step
    widths = {}
    for blur in (False, True):
        cfg = load_config("vicregl_imagenet", {**TINY, "views.crop_size": size, "data.decode_res": size,
                                               "views.jitter_strength": 0.0, "views.blur": blur})
        torch.manual_seed(0)
        model = create_method(cfg)
        torch.manual_seed(1)
        widths[blur] = _edge_widths(model, build_views(cfg.views)(img), size, crop, monkeypatch)
    # Sigma <= 2 px: 10-90 % width <= 2.56 * 2 px, combined with the resize's ~0.8/crop px ramp -> <= 7 px.
    assert int(widths[True].max()) <= 7, f"blur magnified by the crop: edge widths {widths[True].tolist()} px"
    assert widths[True].float().mean() > widths[False].float().mean(), "view 1 (blur p = 1) was not blurred"


def test_crops_are_blurred_then_solarized_with_each_views_probabilities():
    """BYOL's pair: blur view 1 always (p = 1.0), view 2 with p = 0.1 (none without ``views.blur``);
    solarize view 2 with p = 0.2; solarize after the blur, as the paper's code."""
    from sslray.datasets.presets import vicregl_views

    # the preset leaves both to the method
    assert all(p.blur_p == p.solarize_p == 0 for p, _ in vicregl_views(size=224, blur=True))
    model = _model("vicregl_imagenet", 224)
    assert model.tail_p == {"blur_p": (1.0, 0.1), "solarize_p": (0.0, 0.2)}
    n = 1000
    torch.manual_seed(0)
    model._finish(torch.randn(2 * n, 3, 16, 16), n)  # 23-tap kernel at 224 px: reflect-pads 11
    on, sol = model.tail.last_params["blur_on"], model.tail.last_params["solarize"]
    assert on[:n].all() and abs(float(on[n:].float().mean()) - 0.1) < 0.03
    assert not sol[:n].any() and abs(float(sol[n:].float().mean()) - 0.2) < 0.04
    assert load_config("vicregl_cifar10").views.blur is False
    assert _model("vicregl_cifar10", 128).tail_p == {"blur_p": (0.0, 0.0), "solarize_p": (0.0, 0.2)}


def test_solarize_follows_the_blur_on_pixel_values():
    """A view-2 crop drawn for both: blurred first (in pixel values, not normalised ones), then pixels
    >= 0.5 inverted; the result comes back normalised with the views' mean and std."""
    model = _model("vicregl_imagenet", 32)
    model.tail_p = {"blur_p": (0.0, 1.0), "solarize_p": (0.0, 1.0)}
    model.tail.params = replace(model.tail.params, blur_sigma=(2.0, 2.0))  # the widest blur, every draw
    m, s = model.tail.mean, model.tail.std
    img = torch.zeros(1, 3, 32, 32)
    img[..., 16:] = 1.0  # a step edge: blurred, it has values on both sides of 0.5
    x = torch.cat([img, img]) - m
    x = x / s  # normalised, as the crops reach the method
    torch.manual_seed(0)
    out = model._finish(x, 1) * s + m
    torch.manual_seed(0)  # the same blur draws, no solarize
    blurred = model.tail.finish(img.repeat(2, 1, 1, 1), {"blur_p": torch.tensor([0.0, 1.0]),
                                                          "solarize_p": torch.tensor([0.0, 0.0])}) * s + m
    expect = torch.where(blurred[1] >= 0.5, 1.0 - blurred[1], blurred[1])
    assert torch.allclose(out[0], img[0], atol=1e-5)  # view 1: neither step
    assert torch.allclose(out[1], expect, atol=1e-5)
    # solarized first, the 0/1 step would turn all black and stay so when blurred
    assert float(out[1].amax()) > 0.3


@pytest.mark.parametrize("policy", ["simclr", "mae", "orthogonality", "lorot", "dcl"])
def test_view_policies_that_would_move_the_cells_are_refused(policy, tmp_path, capsys):
    """VICRegL's views keep the whole image and the method crops and flips them itself: a policy's
    crop, flips, LoRot or DCL would put image content under other cell positions, silently. Refused in
    the views, by `sslray pretrain` before any worker starts, and by `sslray study` for that cell."""
    from sslray.cli import main
    from sslray.config import ConfigError
    from sslray.datasets.views import build_views
    from sslray.study import make_study_spec, method_config

    cfg = load_config("vicregl_cifar10", {"views.policy": policy})
    with pytest.raises(ConfigError, match=rf"views.policy='{policy}'.*views.preset='vicregl'"):
        build_views(cfg.views)
    build_views(load_config("vicregl_cifar10").views)  # the default policy builds

    assert main(["pretrain", "--recipe", "vicregl_cifar10", "--views", policy, "--data", str(tmp_path / "t.beton"),
                 "--workers", "1", "--gpu", "false", "--storage", str(tmp_path / "runs")]) != 0
    assert "views.policy" in capsys.readouterr().err

    cfgs = {m: method_config(m) for m in ("simclr", "vicregl")}
    with pytest.raises(ConfigError, match=rf"study cell vicregl x {policy}"):
        make_study_spec(cfgs, ["default", policy], name="s", storage=str(tmp_path / "runs"))
