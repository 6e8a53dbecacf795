"""Class lists that train and val share, the .beton header fallback, --classes order, and the
resident loader's caches going stale when their source changes."""

from __future__ import annotations

import csv
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslray.datasets import SOURCES, DataError, DatasetInfo, WriteParams, convert, dataset_info, manifest_path
from sslray.datasets.loader import check_same_classes
from sslray.datasets.resident import load_archive, load_image_folder
from sslray.datasets.sources import select


def write_png(path: Path, value: int, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 255 - value, (7 * value) % 256)).save(path)
    return path


def tree(root: Path, classes: dict[str, int]) -> Path:
    """``root/<class>/<i>.png``, ``classes[c]`` images each, every image its own colour."""
    for k, (c, n) in enumerate(classes.items()):
        for i in range(n):
            write_png(root / c / f"{i}.png", 40 * k + i)
    return root


def write_csv(path: Path, rows: list[tuple[Path, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([(str(p), lab) for p, lab in rows])
    return path


def to_beton(src: Path, out: Path, **kw) -> str:
    convert(src, out, params=WriteParams(max_resolution=8), workers=1, verbose=False, **kw)
    return str(out)


# --- train and val agree on class indices ----------------------------------------------------------

def test_imagefolder_split_takes_the_classes_of_every_split(tmp_path):
    src = tmp_path / "src"
    tree(src / "train", {"cat": 2, "dog": 2, "zebra": 2})
    tree(src / "val", {"cat": 1, "zebra": 1})
    train = SOURCES.get("imagefolder")(src, split="train")
    val = SOURCES.get("imagefolder")(src, split="val")
    assert train.classes == val.classes == ["cat", "dog", "zebra"]
    assert sorted({(Path(r.path).parent.name, r.label) for r in val.records}) == [("cat", 0), ("zebra", 2)]
    assert any("dog" in n for n in val.notes)  # the missing folder is reported in the manifest
    # the same holds end to end: the converted files pass the train/val check
    tr = to_beton(src, tmp_path / "train.beton", split="train")
    va = to_beton(src, tmp_path / "val.beton", split="val")
    assert check_same_classes(dataset_info(tr), dataset_info(va)) == ["cat", "dog", "zebra"]


def test_check_same_classes_names_both_files_and_the_differing_classes():
    train = DatasetInfo("/d/train.beton", 6, ["cat", "dog", "zebra"])
    with pytest.raises(DataError, match=r"/d/train\.beton.*/d/val\.beton.*only in train: dog; only in val: none"):
        check_same_classes(train, DatasetInfo("/d/val.beton", 2, ["cat", "zebra"]))
    with pytest.raises(DataError, match="another order"):
        check_same_classes(train, DatasetInfo("/d/val.beton", 3, ["zebra", "dog", "cat"]))
    assert check_same_classes(train, DatasetInfo("/d/val.beton", 3, ["cat", "dog", "zebra"])) == train.classes


def test_check_same_classes_accepts_integer_classes_missing_at_the_top():
    ints = DatasetInfo("/d/train.beton", 9, [str(i) for i in range(12)])
    assert check_same_classes(ints, DatasetInfo("/d/val.beton", 3, ["0", "1", "2"])) == ints.classes
    assert check_same_classes(DatasetInfo("/d/val.beton", 3, ["0", "1"]), ints) == ints.classes
    unlabelled = DatasetInfo("/d/u.beton", 3, [])
    assert check_same_classes(unlabelled, ints) == ints.classes


def test_probe_refuses_csv_splits_that_number_classes_differently(tmp_path):
    """Name labels sort per file: a val CSV without "dog" would call zebra 1, train calls it 2."""
    from sslray.raytrain.evaluate import probe_checkpoint

    imgs = tree(tmp_path / "imgs", {"cat": 2, "dog": 2, "zebra": 2})
    rows = [(f, f.parent.name) for f in sorted(imgs.glob("*/*.png"))]
    tr = to_beton(write_csv(tmp_path / "train.csv", rows), tmp_path / "train.beton", source="csv")
    va = to_beton(write_csv(tmp_path / "val.csv", [r for r in rows if r[1] != "dog"]), tmp_path / "val.beton",
                  source="csv")
    with pytest.raises(DataError) as e:  # before the checkpoint is even looked for
        probe_checkpoint(str(tmp_path / "no-checkpoint"), tr, va, use_gpu="false")
    assert tr in str(e.value) and va in str(e.value) and "only in train: dog" in str(e.value)


# --- a .beton read without its manifest --------------------------------------------------------------

def test_header_fallback_counts_the_labelled_classes(tmp_path):
    beton = to_beton(tree(tmp_path / "src", {"cat": 2, "dog": 1, "eel": 3}), tmp_path / "x.beton")
    assert dataset_info(beton).classes == ["cat", "dog", "eel"]
    os.remove(manifest_path(beton))
    info = dataset_info(beton)
    assert info.num_images == 6 and info.classes == ["0", "1", "2"]


# --- --classes keeps the source's own class order ----------------------------------------------------

def test_classes_n_keeps_integer_csv_classes_in_numeric_order(tmp_path):
    rows = [(write_png(tmp_path / f"{i}.png", i), str(i)) for i in range(12)]
    listing = SOURCES.get("csv")(write_csv(tmp_path / "l.csv", rows))
    assert listing.classes[:3] == ["0", "1", "2"] and listing.classes[-1] == "11"
    first3 = select(listing, classes=3)
    assert first3.classes == ["0", "1", "2"]
    assert [(Path(r.path).stem, r.label) for r in first3.records] == [("0", 0), ("1", 1), ("2", 2)]
    named = select(listing, classes="10,2")
    assert named.classes == ["2", "10"]
    assert sorted((Path(r.path).stem, r.label) for r in named.records) == [("10", 1), ("2", 0)]


# --- resident caches follow their source -------------------------------------------------------------

def test_resident_folder_cache_sees_images_added_removed_or_replaced(tmp_path):
    root = tree(tmp_path / "train", {"cat": 2, "dog": 2})
    x, y, classes = load_image_folder(root, res=8)
    assert y.tolist() == [0, 0, 1, 1] and (tmp_path / "train.resident8.npz").exists()
    root_mtime = root.stat().st_mtime_ns
    write_png(root / "dog" / "2.png", 200)
    os.remove(root / "cat" / "0.png")
    assert root.stat().st_mtime_ns == root_mtime  # the tree's own mtime cannot tell
    x, y, _ = load_image_folder(root, res=8)
    assert y.tolist() == [0, 1, 1, 1] and len(x) == 4
    write_png(root / "cat" / "1.png", 123, size=16)  # replaced in place (another size on disk)
    x2, y2, _ = load_image_folder(root, res=8)
    assert y2.tolist() == y.tolist() and not np.array_equal(x2[0], x[0])
    x3, _, _ = load_image_folder(root, res=8)  # unchanged: the cache is used and agrees
    assert np.array_equal(x3, x2)


def test_workers_building_one_resident_cache_at_once_do_not_take_each_others_file(tmp_path, monkeypatch):
    """Each Ray worker of a node loads the same tree in its own process; on a first run they all build
    the cache. Here the second writer runs between the first one's write and its rename."""
    import sslray.datasets.resident as R

    root = tree(tmp_path / "train", {"cat": 2, "dog": 2})
    real, calls = np.savez, []

    def savez_then_another_writer(file, **arrays):
        real(file, **arrays)
        calls.append(1)
        if len(calls) == 1:  # another process writes the same cache now
            R._save_npz(tmp_path / "train.resident8.npz", arrays["images"], arrays["labels"],
                        list(arrays["classes"]), str(arrays["stamp"]))

    monkeypatch.setattr(R.np, "savez", savez_then_another_writer)
    x, y, _ = load_image_folder(root, res=8)
    assert len(calls) == 2 and y.tolist() == [0, 0, 1, 1]
    monkeypatch.setattr(R.np, "savez", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train", "train.resident8.npz"]  # no temp left
    x2, _, _ = load_image_folder(root, res=8)  # read from the cache
    assert np.array_equal(x2, x)


def test_an_unwritable_resident_cache_is_a_warning_not_a_failed_run(tmp_path, monkeypatch):
    import sslray.datasets.resident as R

    root = tree(tmp_path / "train", {"cat": 1, "dog": 1})

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(R.np, "savez", full)
    with pytest.warns(UserWarning, match="train.resident8.npz.*No space left"):
        x, y, _ = load_image_folder(root, res=8)
    assert y.tolist() == [0, 1] and sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def make_archive(path: Path, src: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        tf.add(src, arcname="train")
    return path


def test_resident_archive_cache_is_keyed_on_the_archive_itself(tmp_path):
    cache = tmp_path / "cache"
    a = make_archive(tmp_path / "a" / "data.tar.gz", tree(tmp_path / "ta", {"cat": 1, "dog": 1}))
    b = make_archive(tmp_path / "b" / "data.tar.gz", tree(tmp_path / "tb", {"cat": 2, "dog": 1, "eel": 1}))
    _, ya, ca = load_archive(a, "train", cache_dir=cache)
    _, yb, cb = load_archive(b, "train", cache_dir=cache)  # same base name, another archive
    assert ca == ["cat", "dog"] and cb == ["cat", "dog", "eel"] and yb.tolist() == [0, 0, 1, 2]
    assert load_archive(a, "train", cache_dir=cache)[2] == ca
    make_archive(a, tree(tmp_path / "ta2", {"cat": 1, "dog": 1, "fox": 1}))  # rewritten in place
    _, ya2, ca2 = load_archive(a, "train", cache_dir=cache)
    assert ca2 == ["cat", "dog", "fox"] and ya2.tolist() == [0, 1, 2]
