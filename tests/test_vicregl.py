"""VICRegL against the paper's code (facebookresearch/VICRegL): how many local pairs each matching keeps,
and where in the pipeline the Gaussian blur acts."""

from __future__ import annotations

import inspect

import pytest
import torch

from sslray.config import load_config
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
