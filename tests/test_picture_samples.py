"""The pictures of a run and of the probe draw images spread over class-sorted splits: queries and
fixed images from several classes, a retrieval bank that spans every class (also when capped, and
also when rank 0's own bank loader holds one slice), the same images for the same seed."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SORTED_CLASSES as CLASSES, SORTED_PER_CLASS as PER_CLASS
TOTAL = CLASSES * PER_CLASS



class MeanColour(nn.Module):
    """A backbone whose feature is each image's mean colour: enough for a retrieval grid."""

    def forward(self, x):
        return x.mean((2, 3))


def run_config(beton: str, seed: int = 0):
    from sslray.config import load_config

    return load_config("smoke", [f"data.train={beton}", f"data.val={beton}", "data.train_subset=0",
                                 "data.val_subset=0", "data.knn_bank=0", "data.batch_size=4", "monitor.num_images=4",
                                 f"train.seed={seed}", "ray.num_workers=1"])


@functools.lru_cache(maxsize=None)
def every_image(beton: str, res: int) -> torch.Tensor:
    from sslray.datasets.loader import make_loader

    x, _ = next(iter(make_loader(beton, TOTAL, res=res, device=torch.device("cpu"), train=False, num_workers=1)))
    return x.clone()


def file_indices(beton: str, x: torch.Tensor, res: int) -> list[int]:
    """Which images of the .beton ``x`` holds, by their very pixels (decoded as the pictures decode them)."""
    dist = (x.float()[:, None] - every_image(beton, res).float()[None]).abs().flatten(2).mean(2)
    assert dist.min(1).values.max() == 0, "an image that is not in the file"
    return dist.argmin(1).tolist()


def classes_of(indices) -> set[int]:
    return {i // PER_CLASS for i in indices}


def spy_retrieval(monkeypatch) -> list[dict]:
    """Record the queries and the bank every retrieval grid is drawn from, then draw it."""
    from sslray.raytrain import pictures

    seen, real = [], pictures.retrieval_figure

    def spy(backbone, bank, queries, *a, **k):
        batches = [(x.clone(), y.clone()) for x, y in bank]
        seen.append({"queries": queries.clone(), "bank": torch.cat([x for x, _ in batches])})
        return real(backbone, batches, queries, *a, **k)

    monkeypatch.setattr(pictures, "retrieval_figure", spy)
    return seen


def run_pictures(cfg, world: int = 1):
    """Rank 0's ``RunPictures`` over the data ``build_data`` gives; ``world`` > 1 gives rank 0 its slice of
    the bank, as ``build_data`` does on rank 0 of that many workers."""
    from sslray.datasets.loader import eval_slice, make_loader
    from sslray.datasets.views import eval_transform
    from sslray.raytrain.data import build_data
    from sslray.raytrain.pictures import RunPictures
    from sslray.raytrain.session import LocalSession

    logs = []
    session = LocalSession(None, use_gpu="false", printer=lambda m, **_: logs.append(m))
    data = build_data(cfg, session)
    if world > 1:
        session.world_size = world
        data.bank = make_loader(cfg.data.train, 256, res=cfg.data.decode_res, device=session.device, train=False,
                                indices=eval_slice(None, TOTAL, 0, world), num_workers=1)
    model = SimpleNamespace(backbone=MeanColour())
    return RunPictures(cfg, session, model, data, None, eval_transform(cfg.views)), session, logs


def draw_retrieval(cfg, world: int = 1):
    """The end-of-run pictures of rank 0 (``world`` workers); the retrieval grid must be among them."""
    from sslray.raytrain.pictures import RETRIEVAL_PNG

    pics, session, logs = run_pictures(cfg, world)
    pics.after_epoch(cfg.train.epochs, last=True)
    assert RETRIEVAL_PNG in session.pictures, logs
    return pics, session


def test_run_pictures_show_every_class_of_a_class_sorted_split(sorted_beton, monkeypatch):
    from sslray.raytrain import pictures

    monkeypatch.setattr(pictures, "MAX_BANK", 8, raising=False)  # a bank capped below the split's 24 images
    seen = spy_retrieval(monkeypatch)
    cfg = run_config(sorted_beton)
    pics, _ = draw_retrieval(cfg)
    res = cfg.data.decode_res
    fixed = file_indices(sorted_beton, pics.fixed_images(), res)
    assert classes_of(fixed) == set(range(CLASSES)), fixed  # MAE reconstructions and retrieval queries
    assert file_indices(sorted_beton, seen[0]["queries"], res) == fixed
    bank = file_indices(sorted_beton, seen[0]["bank"], res)
    assert len(bank) == 8 == len(set(bank)) and classes_of(bank) == set(range(CLASSES)), bank


def test_run_retrieval_bank_spans_the_split_not_rank_0s_slice(sorted_beton, monkeypatch):
    """Two workers: rank 0's bank loader holds the first half (two classes); the grid's bank is as large
    (the same cost) but spread over the whole split."""
    seen = spy_retrieval(monkeypatch)
    cfg = run_config(sorted_beton)
    draw_retrieval(cfg, world=2)
    bank = file_indices(sorted_beton, seen[0]["bank"], cfg.data.decode_res)
    assert len(bank) == TOTAL // 2 == len(set(bank)) and classes_of(bank) == set(range(CLASSES)), bank


def test_run_pictures_same_seed_same_images(sorted_beton, monkeypatch):
    """A run's pictures show the same images every epoch and after a resume (a new ``RunPictures``);
    another seed shows others."""
    seen = spy_retrieval(monkeypatch)
    res = run_config(sorted_beton).data.decode_res
    drawn = []
    for seed in (0, 0, 5):
        pics, _ = draw_retrieval(run_config(sorted_beton, seed), world=2)
        drawn.append((file_indices(sorted_beton, pics.fixed_images(), res),
                      file_indices(sorted_beton, seen[-1]["bank"], res)))
    assert drawn[0] == drawn[1]
    assert drawn[2][0] != drawn[0][0] and drawn[2][1] != drawn[0][1]


def probe_retrieval(beton: str, seed: int = 0, tr_idx=None, va_idx=None, monkeypatch=None):
    from sslray.raytrain.evaluate import _retrieval
    from sslray.raytrain.pictures import RETRIEVAL_PNG

    seen, logs = spy_retrieval(monkeypatch), []
    cfg = run_config(beton, seed)
    out = _retrieval(MeanColour(), beton, beton, tr_idx, va_idx, cfg, torch.device("cpu"), 256, logs.append)
    assert RETRIEVAL_PNG in out, logs
    res = cfg.data.decode_res
    return file_indices(beton, seen[-1]["queries"], res), file_indices(beton, seen[-1]["bank"], res)


def test_probe_retrieval_shows_every_class_and_caps_its_bank_by_spreading(sorted_beton, monkeypatch):
    from sslray.raytrain import pictures

    monkeypatch.setattr(pictures, "MAX_BANK", 8, raising=False)
    queries, bank = probe_retrieval(sorted_beton, monkeypatch=monkeypatch)
    assert classes_of(queries) == set(range(CLASSES)), queries
    assert len(bank) == 8 == len(set(bank)) and classes_of(bank) == set(range(CLASSES)), bank
    assert probe_retrieval(sorted_beton, monkeypatch=monkeypatch) == (queries, bank)  # same seed, same images
    assert probe_retrieval(sorted_beton, 5, monkeypatch=monkeypatch)[0] != queries
    # Probe subsets: the images come from them, still spread over the classes.
    tr_idx, va_idx = np.arange(0, TOTAL, 2), np.arange(1, TOTAL, 2)
    queries, bank = probe_retrieval(sorted_beton, tr_idx=tr_idx, va_idx=va_idx, monkeypatch=monkeypatch)
    assert set(queries) <= set(va_idx.tolist()) and classes_of(queries) == set(range(CLASSES)), queries
    assert set(bank) <= set(tr_idx.tolist()) and classes_of(bank) == set(range(CLASSES)), bank


@pytest.mark.parametrize("total,n", [(24, 4), (24, 30), (10, 0), (0, 3)])
def test_spread_subset_samples_the_split_it_is_given(total, n):
    from sslray.datasets.loader import spread_indices, spread_subset

    assert spread_subset(None, total, n, 3).tolist() == spread_indices(total, n, 3)
    sub = np.arange(100, 100 + 2 * total, 2)
    picked = spread_subset(sub, 10_000, n, 3)
    assert picked.tolist() == sub[spread_indices(total, n, 3)].tolist() and len(picked) == min(n, total)
