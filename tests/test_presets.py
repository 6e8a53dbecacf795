"""Multi-crop presets against their reference code: SwAV's and DINO's colour jitter."""

from __future__ import annotations

import pytest

from sslray.config import load_config
from sslray.datasets.views import PRESETS


def recipe_views(recipe: str):
    v = load_config(recipe).views
    return PRESETS.get(v.preset)(size=v.crop_size, min_scale=v.min_scale, jitter_strength=v.jitter_strength,
                                 blur=v.blur)


@pytest.mark.parametrize("recipe", ["swav_cifar10", "swav_imagenet"])
def test_swav_recipes_use_swav_colour_distortion(recipe):
    """facebookresearch/swav src/multicropdataset.py, get_color_distortion(s=1.0):
    RandomApply(ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), p=0.8), RandomGrayscale(p=0.2)."""
    spec = recipe_views(recipe)
    assert sum(n for _, n in spec) == 8  # 2 global + 6 local crops
    for p, _ in spec:
        assert p.jitter == pytest.approx((0.8, 0.8, 0.8, 0.2)) and p.jitter_p == 0.8 and p.grey_p == 0.2


def test_swav_jitter_follows_strength_as_simclr():
    spec = PRESETS.get("swav")(size=32, jitter_strength=0.5)
    assert all(p.jitter == pytest.approx((0.4, 0.4, 0.4, 0.1)) for p, _ in spec)


@pytest.mark.parametrize("recipe", ["dino_cifar10", "dino_imagenet"])
def test_dino_keeps_byol_jitter(recipe):
    """DINO's global and local crops: ColorJitter(0.4, 0.4, 0.2, 0.1) at p=0.8, grey p=0.2."""
    for p, _ in recipe_views(recipe):
        assert p.jitter == pytest.approx((0.4, 0.4, 0.2, 0.1)) and p.jitter_p == 0.8 and p.grey_p == 0.2
