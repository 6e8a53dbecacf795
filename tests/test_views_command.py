"""`sslray views` draws images spread over a class-sorted .beton (several classes, a seeded and
reproducible sample), not its first images, which share one class."""

from __future__ import annotations

import pytest

from conftest import SORTED_CLASSES as CLASSES, SORTED_PER_CLASS as PER_CLASS



def drawn_indices(beton: str, tmp_path, monkeypatch, *args: str) -> tuple[list[int], list[int]]:
    """The dataset indices and labels of the source images `sslray views` drew, found by matching its
    source column against every image of the .beton, decoded as the command decodes them."""
    import torch

    from sslray.cli import main
    from sslray.datasets.loader import make_loader
    from sslray.raytrain import pictures
    from sslray.raytrain.methods import recipe_config as method_config

    seen = []
    real = pictures.views_figure
    monkeypatch.setattr(pictures, "views_figure", lambda x, *a, **k: seen.append(x.clone()) or real(x, *a, **k))
    assert main(["views", "--data", beton, "--method", "simclr", "--out", str(tmp_path / "v.png"), *args]) == 0
    res = method_config("simclr").data.decode_res
    every, labels = next(iter(make_loader(beton, CLASSES * PER_CLASS, res=res, device=torch.device("cpu"),
                                          train=False, num_workers=1)))
    dist = (seen[0].float()[:, None] - every.float()[None]).abs().flatten(2).mean(2)
    idx = dist.argmin(1).tolist()
    assert dist.min(1).values.max() == 0  # the very pixels of the .beton
    return idx, labels[idx].tolist()


def test_views_draws_several_classes_of_a_class_sorted_beton(sorted_beton, tmp_path, monkeypatch):
    idx, classes = drawn_indices(sorted_beton, tmp_path, monkeypatch, "-n", "4")
    assert sorted(set(classes)) == list(range(CLASSES)), idx  # one image per class-sized stretch here
    assert drawn_indices(sorted_beton, tmp_path, monkeypatch, "-n", "4")[0] == idx  # reproducible

    from sslray.datasets.loader import spread_indices

    assert idx == spread_indices(CLASSES * PER_CLASS, 4, 0)
    assert drawn_indices(sorted_beton, tmp_path, monkeypatch, "-n", "4", "--seed", "3")[0] == spread_indices(
        CLASSES * PER_CLASS, 4, 3) != idx


@pytest.mark.parametrize("total,n", [(24, 4), (10, 3), (5, 5), (3, 8), (50000, 8)])
def test_spread_indices_one_per_stretch(total, n):
    from sslray.datasets.loader import spread_indices

    for seed in range(5):
        idx = spread_indices(total, n, seed)
        assert len(idx) == min(n, total) and idx == sorted(set(idx))
        m = min(n, total)
        assert all(j * total // m <= i < (j + 1) * total // m for j, i in enumerate(idx))  # one per stretch
    assert spread_indices(total, n, 1) == spread_indices(total, n, 1)
