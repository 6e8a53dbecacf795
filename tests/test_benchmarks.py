"""GPU-resident loader (order, sharding, drop_last, sources) and the two GPU benchmarks' --tiny paths on CPU."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sslray.datasets.resident import ResidentDataset, ResidentLoader, load_archive, load_image_folder, shard_order

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from conftest import CIFAR_ARCHIVE as ARCHIVE, drop_ray_lines, require_archive  # noqa: E402


def _data(n=50, res=4):
    x = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, res, res)
    return ResidentDataset(x.clone(), torch.arange(n) % 10, [str(i) for i in range(10)])


def _ids(loader, epoch):
    loader.next_epoch = epoch
    return [int(v) for x, _ in loader for v in x[:, 0, 0, 0]]  # each image's pixel value is its index


def test_yields_uint8_nchw_and_int64_labels_matching_images():
    ds = _data()
    x, y = next(iter(ResidentLoader(ds, 8, train=True, seed=0)))
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 4, 4) and y.dtype == torch.int64
    assert torch.equal(x[:, 0, 0, 0].long() % 10, y)  # each label travels with its own image


def test_order_reseeded_per_epoch_reproducible_and_sequential_for_eval():
    ds = _data()
    a, b = ResidentLoader(ds, 10, train=True, seed=3), ResidentLoader(ds, 10, train=True, seed=3)
    e0, e1 = _ids(a, 0), _ids(a, 1)
    assert e0 != e1 and sorted(e0) == sorted(e1) == list(range(50))
    assert _ids(b, 1) == e1  # resume: next_epoch alone gives the same order back
    assert _ids(ResidentLoader(ds, 10, train=True, seed=4), 0) != e0
    assert _ids(ResidentLoader(ds, 10, train=False), 0) == list(range(50))


def test_drop_last_for_training_only():
    ds = _data(50)
    tr, ev = ResidentLoader(ds, 16, train=True), ResidentLoader(ds, 16, train=False)
    assert len(tr) == 3 and [x.shape[0] for x, _ in tr] == [16, 16, 16]
    assert len(ev) == 4 and [x.shape[0] for x, _ in ev] == [16, 16, 16, 2]


@pytest.mark.parametrize("n,world", [(48, 4), (50, 4), (7, 3)])
def test_shards_disjoint_and_cover_like_distributed_sampler(n, world):
    from torch.utils.data import DistributedSampler

    for epoch in (0, 1):
        shards = [shard_order(n, epoch, seed=5, shuffle=True, rank=r, world_size=world).tolist() for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        flat = sum(shards, [])
        assert set(flat) == set(range(n)) and len(flat) - n == (-n) % world  # only the padding repeats
        for r in range(world):  # the same shards torch's DistributedSampler gives
            s = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=5)
            s.set_epoch(epoch)
            assert shards[r] == list(s)
    ds = _data(48)
    loaders = [ResidentLoader(ds, 4, train=True, seed=1, rank=r, world_size=4) for r in range(4)]
    got = [set(_ids(ld, 2)) for ld in loaders]
    assert all(len(g) == 12 for g in got) and set().union(*got) == set(range(48))
    assert len(loaders[0]) == 3


def test_subset_indices_respected():
    ld = ResidentLoader(_data(), 5, train=True, indices=[1, 3, 5, 7, 9, 11, 13, 15, 17, 19])
    assert sorted(_ids(ld, 0)) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]


def test_image_folder_and_archive_sources_agree(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "tree" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "tree" / c / f"{i}.png")
    x, y, classes = load_image_folder(tmp_path / "tree")
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1] and classes == ["a", "b"]
    assert (tmp_path / "tree.resident0.npz").exists()
    x2, _, _ = load_image_folder(tmp_path / "tree")  # from the cache
    assert np.array_equal(x, x2)
    import tarfile

    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "tree", arcname="train")
    xa, ya, ca = load_archive(tmp_path / "t.tar.gz", "train", per_class=2)
    assert np.array_equal(xa, x[[0, 1, 3, 4]]) and ya.tolist() == [0, 0, 1, 1] and ca == classes
    xr, _, _ = load_image_folder(tmp_path / "tree", res=4, cache=False)
    assert xr.shape == (6, 3, 4, 4)
    # make_loader's drop-in: same keywords, one resident copy shared by the train and eval loaders
    from sslray.datasets.resident import make_resident_loader

    kw = dict(res=8, device=torch.device("cpu"), num_workers=2, os_cache=True, batches_ahead=2, distributed=False)
    tr = make_resident_loader(str(tmp_path / "tree"), 2, train=True, seed=0, **kw)
    ev = make_resident_loader(str(tmp_path / "tree"), 4, train=False, indices=[0, 5], **kw)
    assert tr.data is ev.data and len(tr) == 3 and len(ev) == 1
    xe, ye = next(iter(ev))
    assert torch.equal(xe, torch.from_numpy(x[[0, 5]])) and ye.tolist() == [0, 1]


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    require_archive(ARCHIVE)
    d = tmp_path_factory.mktemp("bench-cache")
    load_archive(ARCHIVE, "test", per_class=8, cache_dir=d)  # one archive pass, shared by both scripts
    x, y, c = load_archive(ARCHIVE, "test", per_class=30, cache_dir=d)
    assert x.shape == (300, 3, 32, 32)
    return d


def test_throughput_tiny_prints_table_and_appends(bench_cache, tmp_path, monkeypatch, capsys):
    import common
    import throughput

    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(common, "RESULTS", results)
    monkeypatch.setattr(common.append_results, "__defaults__", (results,))
    # Rows 1 and 3: a contrastive ResNet and MAE; the other rows share these code paths (manual: all rows).
    assert throughput.main(["--tiny", "--rows", "1,3", "--runs", "2", "--cache-dir", str(bench_cache), "--append"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| SimCLR") or ln.startswith("| MAE")]
    assert len(rows) == 4 and sum("resident" in r for r in rows) == 2 and sum("synthetic" in r for r in rows) == 2
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[4].replace(",", "")) > 0 and len(cells[5].split(", ")) == 2
    text = results.read_text()
    assert "NOT performance" in text and "benchmarks/throughput.py --tiny" in text and "median of 2" in text


def test_throughput_compare_times_an_override_beside_the_row(bench_cache, capsys, monkeypatch):
    import throughput

    seen, real = [], throughput.measure
    monkeypatch.setattr(throughput, "measure", lambda cfg, *a: seen.append(cfg) or real(cfg, *a))
    assert throughput.main(["--tiny", "--rows", "1", "--runs", "1", "--cache-dir", str(bench_cache), "--no-synthetic",
                            "--compare", "optim.base_lr=0.5"]) == 0
    assert [c.optim.base_lr for c in seen] == [0.12, 0.5]  # the recipe's, then the override's
    assert seen[0].replace(**{"optim.base_lr": 0.5}) == seen[1]  # and nothing else differs
    out = drop_ray_lines(capsys.readouterr().out)
    assert "| vs optim.base_lr=0.5 |" in out.splitlines()[0]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in out.splitlines() if ln.startswith("| SimCLR")]
    src = "resident (cifar10-jpeg.tar.gz)"
    assert [r[3] for r in rows] == [src, f"{src}, optim.base_lr=0.5"]
    base, variant = (float(r[4].replace(",", "")) for r in rows)
    assert rows[0][-1] == "1.00x" and rows[1][-1].endswith("x")
    # The printed medians are rounded to 0.1 img/s (tiny CPU rates are tens of img/s), so the ratio
    # of the printed figures is only known within that rounding; the column must fall inside it.
    lo, hi = (variant - 0.05) / (base + 0.05), (variant + 0.05) / (base - 0.05)
    assert lo - 0.005 <= float(rows[1][-1][:-1]) <= hi + 0.005, (rows[1][-1], lo, hi)


def test_time_to_accuracy_tiny_writes_csv_and_png(bench_cache, tmp_path, capsys):
    import time_to_accuracy as tta

    out = tmp_path / "tta"
    assert tta.main(["--tiny", "--methods", "simclr", "--cache-dir", str(bench_cache), "--out", str(out),
                     "--set", "train.epochs=2", "train.max_steps_per_epoch=1"]) == 0
    rows = list(csv.DictReader(open(out / "simclr.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    walls = [float(r["wall_s"]) for r in rows]
    assert 0 < walls[0] < walls[1]
    assert all(0.0 <= float(r["knn_top1"]) <= 1.0 for r in rows)
    assert (out / "simclr.png").stat().st_size > 1000
    # A tagged variant (multi-crop SimCLR) lands beside the recipe's own curve, not over it.
    before = (out / "simclr.csv").read_bytes()
    assert tta.main(["--tiny", "--methods", "simclr", "--cache-dir", str(bench_cache), "--out", str(out),
                     "--set", "train.epochs=1", "train.max_steps_per_epoch=1", "views.local_crops=2",
                     "--tag", "multicrop2"]) == 0
    assert "| simclr (multicrop2) | 1 |" in capsys.readouterr().out
    assert [int(r["epoch"]) for r in csv.DictReader(open(out / "simclr-multicrop2.csv"))] == [1]
    assert (out / "simclr-multicrop2.png").stat().st_size > 1000 and (out / "simclr.csv").read_bytes() == before


def test_views_tiny_compares_backends_side_by_side(tmp_path, monkeypatch, capsys):
    import common
    import views as views_bench

    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(common.append_results, "__defaults__", (results,))
    assert views_bench.main(["--tiny", "--runs", "2", "--append"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if "[tiny]" in ln]
    assert len(rows) == 6 and {r.split("|")[2].strip() for r in rows} == {"fused", "fused-per-view", "kornia"}
    kornia_rows = [r for r in rows if "| kornia |" in r]
    assert all(r.strip().endswith("| 1.00x |") for r in kornia_rows)  # ratios are against kornia
    ops = {r.split("|")[2].strip(): int(r.split("|")[5]) for r in rows[:3]}
    assert ops["fused"] < 0.6 * ops["fused-per-view"]  # the two views share one call's parameter kernels
    assert "benchmarks/views.py --tiny" in results.read_text()


@pytest.mark.slow
def test_profile_step_tiny_names_where_time_goes(bench_cache, tmp_path, capsys):
    import profile_step

    assert profile_step.main(["--tiny", "--cache-dir", str(bench_cache), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "profile_row1.txt").read_text()
    assert "img/s in the loop" in text and "by host time" in text and "aten::" in text
    parts = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| sslray.")}
    assert {"sslray.views", "sslray.forward", "sslray.backward", "sslray.optimizer"} <= set(parts)
    assert all(float(parts[k].split("|")[2]) > 0 for k in ("sslray.views", "sslray.forward", "sslray.optimizer"))


@pytest.mark.slow
def test_time_to_accuracy_budget_fits_epochs(bench_cache, tmp_path, capsys):
    import time_to_accuracy as tta

    out = tmp_path / "tta"
    assert tta.main(["--tiny", "--methods", "simclr", "--cache-dir", str(bench_cache), "--out", str(out),
                     "--budget-min", "0.01"]) == 0
    assert "budget 0.01 min" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "simclr.csv")))
    assert [int(r["epoch"]) for r in rows] == [1]  # no time left: the fit falls back to one epoch


def test_probe_fit_times_the_rule_beside_the_default(capsys):
    import probe_fit

    before = probe_fit.C.RESULTS.read_text()
    assert probe_fit.main(["--sizes", "64", "--runs", "1", "--dim", "16", "--max-iter", "50"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 64 x 16")]
    assert len(rows) == 1 and rows[0].split("|")[2].strip() == "1" and rows[0].rstrip(" |").endswith("x")
    assert probe_fit.C.RESULTS.read_text() == before  # nothing appended without --append


@pytest.mark.slow
@pytest.mark.parametrize("what,names", [("ffcv", ("uncached", "cached")), ("bytecode", ("no bytecode", "bytecode"))])
def test_startup_times_both_variants_in_fresh_processes(capsys, what, names):
    import startup

    before = startup.C.RESULTS.read_text()
    assert startup.main(["--what", what, "--runs", "1"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split("|")[1].strip(): ln for ln in out.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert set(names) <= set(rows)
    assert all(float(rows[k].split("|")[2]) > 0 for k in names)
    assert f"ratio {names[0]} / {names[1]}" in out
    assert startup.C.RESULTS.read_text() == before  # nothing appended without --append


# The lent GPU machines have torch, timm and torchvision but no Ray, FFCV or MLflow: a benchmark that
# reaches any of them (an import moved to module level, a helper that logs to MLflow) costs a GPU
# session its device time. Run the three GPU scripts' --tiny paths with those packages unimportable.
_NO_CLUSTER_PACKAGES = """
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "ffcv", "mlflow"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Absent())
sys.path.insert(0, sys.argv[1])
import profile_step, throughput, time_to_accuracy as tta
cache, out = sys.argv[2], sys.argv[3]
assert throughput.main(["--tiny", "--rows", "1", "--runs", "1", "--steps", "2", "--cache-dir", cache]) == 0
assert tta.main(["--tiny", "--methods", "byol", "--cache-dir", cache, "--out", out,
                 "--set", "train.epochs=1", "train.max_steps_per_epoch=1"]) == 0
assert profile_step.main(["--tiny", "--cache-dir", cache, "--out", out]) == 0
print("loaded:", sorted({m.split(".")[0] for m in sys.modules} & {"ray", "ffcv", "mlflow", "torch"}))
"""


def test_gpu_scripts_run_without_ray_ffcv_or_mlflow(bench_cache, tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-c", _NO_CLUSTER_PACKAGES, str(REPO / "benchmarks"), str(bench_cache),
                        str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded: ['torch']" in r.stdout  # the blocker was on the path and nothing reached past it
    assert (tmp_path / "byol.csv").exists() and (tmp_path / "profile_row1.txt").exists()
