"""Every registered source converts real data (shared CIFAR-10 and Imagenette) through `sslray convert`."""

from __future__ import annotations

import csv
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslray.cli import main
from sslray.datasets import SOURCES, SourceError, WriteParams, convert, read_manifest
from sslray.datasets.loader import read_image
from sslray.datasets.sources import select

from conftest import CIFAR_ARCHIVE, IMAGENETTE_ARCHIVE, require_archive

NAMES = {  # Imagenette's wnids -> names, as an ImageNet-100 Labels.json would hold them
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn", "n03417042": "garbage truck",
    "n03425413": "gas pump", "n03445777": "golf ball", "n03888257": "parachute",
}


def extract_subset(archive: Path, root: Path, want: dict[str, int]) -> Path:
    """The first ``want[split]`` images of every class of an ImageFolder archive (a real subset,
    without unpacking all of it)."""
    require_archive(archive)
    seen: dict[tuple[str, str], int] = {}
    with tarfile.open(archive) as tf:
        members = []
        for m in tf:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) >= 3 and parts[-3] in want:
                key = (parts[-3], parts[-2])
                if seen.get(key, 0) < want[parts[-3]]:
                    seen[key] = seen.get(key, 0) + 1
                    m.name = "/".join(parts[-3:])
                    members.append(m)
        tf.extractall(root, members=members, filter="data")
    return root


@pytest.fixture(scope="module")
def imagenette(tmp_path_factory) -> Path:
    """Real Imagenette: 8 train and 3 val images per class."""
    return extract_subset(IMAGENETTE_ARCHIVE, tmp_path_factory.mktemp("imagenette"), {"train": 8, "val": 3})


@pytest.fixture(scope="module")
def cifar_small(tmp_path_factory) -> dict:
    """Real CIFAR-10 test images, 30 per class (ImageFolder), for the pickle sources."""
    root = extract_subset(CIFAR_ARCHIVE, tmp_path_factory.mktemp("cifar"), {"test": 30})
    return {"test_tree": root / "test"}


def build_imagenet100(src: Path, dst: Path) -> Path:
    """The ImageNet-100 layout from Imagenette files: train images dealt over train.X1..X4."""
    for k, d in enumerate(sorted((src / "train").iterdir())):
        for i, f in enumerate(sorted(d.iterdir())):
            out = dst / f"train.X{1 + (i + k) % 4}" / d.name
            out.mkdir(parents=True, exist_ok=True)
            os.link(f, out / f.name)
    for d in sorted((src / "val").iterdir()):
        (dst / "val.X" / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir()):
            os.link(f, dst / "val.X" / d.name / f.name)
    (dst / "Labels.json").write_text(json.dumps(NAMES))
    return dst


def build_cifar_pickles(tree: Path, dst: Path, kind: str) -> tuple[Path, dict]:
    """Official python-pickle batches holding real CIFAR-10 images; returns the expected arrays."""
    files = sorted((f, i) for i, d in enumerate(sorted(tree.iterdir())) for f in sorted(d.iterdir()))
    data = np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1).reshape(-1) for f, _ in files])
    labels = [i for _, i in files]
    dst.mkdir(parents=True)
    names = sorted(p.name for p in tree.iterdir())
    if kind == "cifar10":
        parts = {f"data_batch_{b}": slice(b - 1, None, 5) for b in range(1, 6)} | {"test_batch": slice(0, 10)}
        order = np.concatenate([np.arange(len(labels))[sl] for name, sl in parts.items() if name != "test_batch"])
        for name, sl in parts.items():
            with open(dst / name, "wb") as fh:
                pickle.dump({b"data": data[sl], b"labels": labels[sl], b"batch_label": name.encode()}, fh)
        with open(dst / "batches.meta", "wb") as fh:
            pickle.dump({b"label_names": [n.encode() for n in names]}, fh)
    else:
        order = np.arange(len(labels))
        fine = names + [f"extra_{i}" for i in range(90)]
        for name, sl in {"train": slice(None), "test": slice(0, 10)}.items():
            with open(dst / name, "wb") as fh:
                pickle.dump({b"data": data[sl], b"fine_labels": labels[sl], b"coarse_labels": [0] * len(labels[sl])},
                            fh)
        with open(dst / "meta", "wb") as fh:
            pickle.dump({b"fine_label_names": [n.encode() for n in fine]}, fh)
    return dst, {"data": data[order], "labels": [labels[i] for i in order]}  # in train-split order


# Each registered source -> (source path, extra CLI args, expected images): a new source adds itself here.
def _src_imagefolder(imagenette, cifar_small, tmp):
    return imagenette, ["--split", "train"], 80


def _src_imagenet100(imagenette, cifar_small, tmp):
    return build_imagenet100(imagenette, tmp / "in100"), ["--split", "train"], 80


def _src_cifar(kind):
    def build(imagenette, cifar_small, tmp):
        return build_cifar_pickles(cifar_small["test_tree"], tmp / kind, kind)[0], ["--split", "train"], 300

    return build


def _src_unlabelled(imagenette, cifar_small, tmp):
    return imagenette / "val", [], 30


def _src_csv(imagenette, cifar_small, tmp):
    out = tmp / "lists" / "train.csv"
    out.parent.mkdir()
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for d in sorted((imagenette / "train").iterdir()):
            for f in sorted(d.iterdir()):
                w.writerow([os.path.relpath(f, out.parent), d.name])
    return out, [], 80


BUILDERS = {"imagefolder": _src_imagefolder, "imagenet100": _src_imagenet100, "cifar10": _src_cifar("cifar10"),
            "cifar100": _src_cifar("cifar100"), "unlabelled": _src_unlabelled, "csv": _src_csv}


def test_every_source_has_a_test():
    assert set(SOURCES.names()) == set(BUILDERS)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_source_converts_real_data_through_cli(name, imagenette, cifar_small, tmp_path, capsys):
    src, args, n = BUILDERS[name](imagenette, cifar_small, tmp_path)
    out = tmp_path / "out" / "data.beton"
    rc = main(["convert", str(src), str(out), "--source", name, "--workers", "2", "--max-res", "64", *args])
    assert rc == 0
    m = read_manifest(out)
    assert m["num_images"] == n and m["num_skipped"] == 0 and m["source_type"] == name
    assert f"{n} images converted, 0 skipped" in capsys.readouterr().out
    img, label = read_image(str(out), 0)
    assert img.dtype == np.uint8 and img.ndim == 3 and max(img.shape[:2]) <= 64
    assert label == (-1 if name == "unlabelled" else 0)


def test_imagenet100_merges_train_parts_and_names_classes(imagenette, tmp_path):
    src = build_imagenet100(imagenette, tmp_path / "in100")
    train = convert(src, tmp_path / "train.beton", source="imagenet100", split="train", workers=1, verbose=False,
                    params=WriteParams(max_resolution=32))
    val = convert(src, tmp_path / "val.beton", source="imagenet100", split="val", workers=1, verbose=False,
                  params=WriteParams(max_resolution=32))
    assert train["num_images"] == 80 and val["num_images"] == 30
    assert train["classes"] == val["classes"] == sorted(NAMES)
    assert train["class_names"] == NAMES
    assert set(train["class_counts"].values()) == {8}
    # --classes 4 keeps the first 4 wnids in sorted order, renumbered 0..3, in both splits
    sub = convert(src, tmp_path / "sub.beton", source="imagenet100", split="val", classes="4", workers=1,
                  verbose=False, params=WriteParams(max_resolution=32))
    assert sub["classes"] == sorted(NAMES)[:4] and sub["num_images"] == 12
    assert sub["class_names"] == {w: NAMES[w] for w in sorted(NAMES)[:4]}


def test_imagenet100_missing_labels_json_warns_and_uses_wnids(imagenette, tmp_path):
    src = build_imagenet100(imagenette, tmp_path / "in100")
    (src / "Labels.json").unlink()
    with pytest.warns(UserWarning, match="Labels.json not found"):
        m = convert(src, tmp_path / "v.beton", source="imagenet100", split="val", workers=1, verbose=False)
    assert m["class_names"] == {} and m["classes"] == sorted(NAMES)
    assert any("Labels.json not found" in n for n in m["notes"])


def test_imagenet100_rejects_unknown_split(imagenette, tmp_path):
    src = build_imagenet100(imagenette, tmp_path / "in100")
    with pytest.raises(SourceError, match="train, val"):
        convert(src, tmp_path / "x.beton", source="imagenet100", split="test", verbose=False)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_pickles_keep_pixels_labels_and_names(kind, cifar_small, tmp_path):
    src, want = build_cifar_pickles(cifar_small["test_tree"], tmp_path / kind, kind)
    m = convert(src, tmp_path / "t.beton", source=kind, split="train", params=WriteParams(write_mode="raw",
                max_resolution=32), workers=2, verbose=False)
    assert m["num_images"] == 300
    assert m["classes"][:10] == sorted(p.name for p in cifar_small["test_tree"].iterdir())
    assert len(m["classes"]) == (10 if kind == "cifar10" else 100)
    for r in (0, 1, 299):  # raw mode: the stored pixels are the pickle's pixels
        img, label = read_image(str(tmp_path / "t.beton"), r)
        np.testing.assert_array_equal(img, want["data"][r].reshape(3, 32, 32).transpose(1, 2, 0))
        assert label == want["labels"][r]
    test = convert(src, tmp_path / "test.beton", source=kind, split="test", workers=1, verbose=False)
    assert test["num_images"] == 10


def test_csv_resolves_relative_paths_and_reports_bad_rows(imagenette, tmp_path):
    f = sorted((imagenette / "val" / "n01440764").iterdir())
    lst = tmp_path / "list.csv"
    lst.write_text(
        f"{os.path.relpath(f[0], tmp_path)},3\n"  # relative to the CSV's folder
        f"{f[1]},1\n"  # absolute
        f"{f[2]}\n"  # no label: unlabelled
        "missing.jpg,1\n"
        f"{f[0]},1,extra\n"
    )
    m = convert(lst, tmp_path / "c.beton", source="csv", workers=1, verbose=False)
    assert m["num_images"] == 3 and m["classes"] == ["0", "1", "2", "3"]
    assert m["class_counts"]["3"] == 1 and m["class_counts"]["1"] == 1 and m["unlabelled"] == 1
    reasons = {Path(s["path"]).name.split(":")[0]: s["reason"] for s in m["skipped"]}
    assert "file does not exist" in reasons["missing.jpg"]
    assert any("bad row" in s["reason"] and s["path"].endswith(":5") for s in m["skipped"])


def test_unlabelled_folder_is_label_minus_one(imagenette, tmp_path):
    m = convert(imagenette / "val", tmp_path / "u.beton", source="unlabelled", workers=1, verbose=False,
                params=WriteParams(max_resolution=32))
    assert m["unlabelled"] == m["num_images"] == 30 and m["classes"] == []


def test_fraction_is_per_class_and_seeded(imagenette, tmp_path):
    from sslray.datasets import SOURCES as S

    listing = S.get("imagefolder")(imagenette, split="train")
    a = select(listing, fraction=0.25, seed=1)
    b = select(listing, fraction=0.25, seed=1)
    c = select(listing, fraction=0.25, seed=2)
    assert [r.path for r in a.records] == [r.path for r in b.records] != [r.path for r in c.records]
    counts = np.bincount([r.label for r in a.records])
    assert counts.tolist() == [2] * 10


def test_class_list_subset_renumbers(imagenette, tmp_path):
    m = convert(imagenette, tmp_path / "s.beton", split="val", classes="n03888257,n01440764", workers=1,
                verbose=False, params=WriteParams(max_resolution=32))
    assert m["classes"] == ["n01440764", "n03888257"] and m["num_images"] == 6
    with pytest.raises(SourceError, match="nope"):
        convert(imagenette, tmp_path / "t.beton", split="val", classes="nope", verbose=False)


def test_rerun_with_same_source_and_params_is_a_noop(imagenette, tmp_path, capsys):
    out = tmp_path / "v.beton"
    args = ["convert", str(imagenette), str(out), "--split", "val", "--max-res", "32", "--workers", "1"]
    assert main(args) == 0
    first = out.stat().st_mtime_ns, read_manifest(out)["created"]
    capsys.readouterr()
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out.stat().st_mtime_ns, read_manifest(out)["created"]) == first
    # other params, or a changed source file, convert again
    assert main(args + ["--quality", "80"]) == 0
    assert "up to date" not in capsys.readouterr().out
    assert read_manifest(out)["write_params"]["jpeg_quality"] == 80
    victim = next((imagenette / "val" / "n01440764").iterdir())
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    assert main(args + ["--quality", "80"]) == 0
    assert "up to date" not in capsys.readouterr().out


@pytest.mark.slow
def test_full_imagenette_and_cifar10_convert(cifar_root, tmp_path):
    """The complete shared datasets (slow: ~60k + 9k images)."""
    require_archive(IMAGENETTE_ARCHIVE)
    with tarfile.open(IMAGENETTE_ARCHIVE) as tf:
        tf.extractall(tmp_path / "nette", filter="data")
    root = next(p.parent for p in (tmp_path / "nette").rglob("train"))
    m = convert(root, tmp_path / "nette.beton", split="train", workers=2, verbose=False)
    assert m["num_images"] == 9469 and m["num_skipped"] == 0
    m = convert(cifar_root, tmp_path / "c.beton", split="test", workers=2, verbose=False,
                params=WriteParams(max_resolution=32))
    assert m["num_images"] == 10000 and m["num_skipped"] == 0
