"""Loaders: per-worker shards that are disjoint and complete every epoch, order re-seeded per epoch,
and the torchvision fallback with the same interface."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslray.datasets import WriteParams, convert, make_loader
from sslray.datasets.loader import dataset_info, make_torchvision_loader
from sslray.datasets.sources import Record, SourceListing

N = 64  # images; image i has label i, so a batch's labels are its dataset indices
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> dict:
    """An ImageFolder tree of N distinct 16x16 images (label i = index i) and its raw .beton."""
    base = tmp_path_factory.mktemp("indexed")
    rng = np.random.default_rng(0)
    records = []
    for i in range(N):
        d = base / "tree" / f"c{i:03d}"
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / "x.png")
        records.append(Record(str(d / "x.png"), i))
    listing = SourceListing(records, [f"c{i:03d}" for i in range(N)], "imagefolder", str(base / "tree"))
    beton = base / "idx.beton"
    convert(base / "tree", beton, listing=listing, params=WriteParams(write_mode="raw", max_resolution=16),
            workers=1, verbose=False)
    return {"beton": str(beton), "tree": str(base / "tree")}


def labels_of(loader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_random_order_is_reseeded_every_epoch_and_reproducible(indexed):
    a = make_loader(indexed["beton"], 8, res=16, device=CPU, train=True, seed=3, num_workers=1)
    e0, e1 = labels_of(a), labels_of(a)
    assert sorted(e0) == sorted(e1) == list(range(N)) and e0 != e1
    b = make_loader(indexed["beton"], 8, res=16, device=CPU, train=True, seed=3, num_workers=1)
    b.next_epoch = 1  # what the training loop does on resume
    assert labels_of(b) == e1
    c = make_loader(indexed["beton"], 8, res=16, device=CPU, train=True, seed=4, num_workers=1)
    assert labels_of(c) != e0


def test_batches_are_uint8_nchw_and_eval_is_sequential(indexed):
    ev = make_loader(indexed["beton"], 10, res=16, device=CPU, train=False, num_workers=1)
    x, y = next(iter(ev))
    assert x.dtype == torch.uint8 and x.shape == (10, 3, 16, 16) and y.dtype == torch.int64
    assert labels_of(ev) == list(range(N))  # every image once, last partial batch kept


def test_torchvision_loader_has_the_same_interface_and_pixels(indexed):
    ff = make_loader(indexed["beton"], 16, res=16, device=CPU, train=False, num_workers=1)
    tv = make_torchvision_loader(indexed["tree"], 16, res=16, device=CPU, train=False, num_workers=0)
    (xf, yf), (xt, yt) = next(iter(ff)), next(iter(tv))
    assert xt.dtype == torch.uint8 and xt.shape == xf.shape and torch.equal(yt, yf)
    assert torch.equal(xt, xf)  # raw storage at full size: the same pixels
    assert len(tv) == len(ff) == 4
    tr = make_torchvision_loader(indexed["tree"], 8, res=8, device=CPU, train=True, seed=3, num_workers=0)
    e0, e1 = labels_of(tr), labels_of(tr)
    assert sorted(e0) == list(range(N)) and e0 != e1
    # a folder passed to make_loader is served by torchvision (platforms without ffcv)
    assert isinstance(make_loader(indexed["tree"], 8, res=8, device=CPU, train=True), type(tr))
    assert dataset_info(indexed["tree"]).num_images == N


WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from sslray.datasets import make_loader
    from sslray.datasets.loader import make_torchvision_loader
    rank, store, beton, tree, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    cpu = torch.device("cpu")
    seen = {}
    for name, ld in [
        ("ffcv", make_loader(beton, 8, res=16, device=cpu, train=True, seed=5, num_workers=1, distributed=True)),
        ("torchvision", make_torchvision_loader(tree, 8, res=16, device=cpu, train=True, seed=5, num_workers=0,
                                                distributed=True)),
    ]:
        seen[name] = [[int(v) for _, y in ld for v in y] for epoch in range(3)]
    json.dump(seen, open(out, "w"))
    dist.destroy_process_group()
""")


@pytest.mark.slow  # two fresh interpreters importing torch + ffcv: ~40 s on 2 busy cores
def test_two_workers_see_disjoint_shards_that_cover_the_data_every_epoch(indexed, tmp_path):
    """Two real ranks (a single-process gloo group each, as Ray Train sets up) run the real loaders."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(store), indexed["beton"], indexed["tree"],
                               str(tmp_path / f"rank{r}.json")], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for name in ("ffcv", "torchvision"):
        for epoch in range(3):
            a, b = r0[name][epoch], r1[name][epoch]
            assert len(a) == len(b) == N // 2, (name, epoch)
            assert not set(a) & set(b), (name, epoch)
            assert sorted(a + b) == list(range(N)), (name, epoch)
        assert r0[name][0] != r0[name][1] != r0[name][2]  # re-seeded every epoch


def test_ffcv_import_compiles_its_typed_dict_once_per_machine(tmp_path):
    """ffcv builds a numba typed dict when imported, and numba compiled its helpers afresh in every
    process (~4 s of each Ray worker's start on 2 cores). After ``sslray.datasets`` is imported, the
    first process writes them to numba's cache and a second one loads them instead of compiling."""
    probe = textwrap.dedent("""
        import json
        import sslray.datasets  # switches the cache on
        import ffcv  # builds IMAGE_MODES, a numba typed dict
        from numba.typed import typeddict
        print(json.dumps({n: [sum(getattr(typeddict, n).stats.cache_hits.values()),
                              sum(getattr(typeddict, n).stats.cache_misses.values())]
                          for n in ("_make_dict", "_setitem")}))
    """)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert all(hits == 0 and misses > 0 for hits, misses in first.values()), first  # compiled, then saved
    assert any((tmp_path / "numba").rglob("*typeddict*.nbi")), "nothing was written to the cache"
    assert all(hits > 0 and misses == 0 for hits, misses in second.values()), second  # loaded, not compiled
