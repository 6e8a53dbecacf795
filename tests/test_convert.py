"""Conversion round trip on real CIFAR-10 images, atomicity, and the no-op rerun."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sslray.datasets import WriteParams, convert, manifest_path, read_manifest
from sslray.datasets.convert import ConversionError


def _read_all(beton):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(str(beton), batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]})
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.numpy().copy())
        ys.append(y.numpy().reshape(-1).copy())
    return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("mode,tol", [("raw", 0.0), ("jpg", 12.0)])
def test_round_trip_real_cifar(cifar_small, tmp_path, mode, tol):
    tree = cifar_small["test_tree"]
    out = tmp_path / f"c10_{mode}.beton"
    m = convert(tree, out, params=WriteParams(write_mode=mode, max_resolution=32, jpeg_quality=95), workers=2,
                verbose=False)
    classes = sorted(p.name for p in tree.iterdir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((tree / c).iterdir())]
    assert m["num_images"] == len(files) == 300
    assert m["classes"] == classes
    assert m["class_counts"] == {c: 30 for c in classes}
    assert m["skipped"] == [] and m["num_skipped"] == 0
    assert m["write_params"]["write_mode"] == mode

    images, labels = _read_all(out)
    assert labels.tolist() == [i for _, i in files]
    src = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files])
    assert images.shape == src.shape
    err = np.abs(images.astype(np.float32) - src.astype(np.float32)).mean(axis=(1, 2, 3))
    assert err.max() <= tol, f"mean abs pixel error {err.max():.2f} > {tol}"


def test_manifest_is_json_beside_the_beton(cifar_small):
    beton = cifar_small["train"]
    mp = manifest_path(beton)
    assert mp.name == "train.manifest.json"
    m = json.loads(mp.read_text())
    assert m["num_images"] == 1000 and len(m["classes"]) == 10 and m["source_hash"]


def test_rerun_is_a_noop_and_change_reconverts(cifar_small, tmp_path, capsys):
    tree = cifar_small["test_tree"]
    out = tmp_path / "x.beton"
    p = WriteParams(write_mode="raw", max_resolution=32)
    convert(tree, out, params=p, workers=1, verbose=False)
    mtime = out.stat().st_mtime_ns
    convert(tree, out, params=p, workers=1)
    assert "up to date" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == mtime
    convert(tree, out, params=WriteParams(write_mode="raw", max_resolution=24), workers=1, verbose=False)
    assert out.stat().st_mtime_ns != mtime
    assert read_manifest(out)["write_params"]["max_resolution"] == 24


def test_crash_leaves_nothing_that_looks_finished(cifar_small, tmp_path, monkeypatch):
    import ffcv.writer

    def boom(self, *a, **k):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(ffcv.writer.DatasetWriter, "from_indexed_dataset", boom)
    out = tmp_path / "crash.beton"
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert(cifar_small["test_tree"], out, params=WriteParams(max_resolution=32), workers=1, verbose=False)
    assert not out.exists()
    assert not manifest_path(out).exists()
    assert list(tmp_path.iterdir()) == []  # no partial files left behind


def test_output_must_end_in_beton(cifar_small, tmp_path):
    with pytest.raises(ConversionError, match=r"\.beton"):
        convert(cifar_small["test_tree"], tmp_path / "x.bin", verbose=False)


# --- replacing an existing .beton (review finding 11) -------------------------------------------------


def _split_tree(root, n=2):
    """``root/{train,val}/{a,b}/<i>.png``: tiny distinct images."""
    for s, split in enumerate(("train", "val")):
        for c, cls in enumerate("ab"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 6), (40 * s + 10 * c + i, 50, 90)).save(root / split / cls / f"{i}.png")
    return root


def test_a_beton_from_another_split_or_settings_is_only_replaced_with_force(tmp_path, capsys):
    """`convert img keep.beton --split val` over a keep.beton made from --split train replaced it
    without a word; a mistyped OUT must not destroy a conversion whose source may be gone."""
    from sslray.cli import main

    src = _split_tree(tmp_path / "img")
    out = tmp_path / "keep.beton"
    p = WriteParams(write_mode="raw", max_resolution=8)
    convert(src, out, split="train", params=p, workers=1, verbose=False)
    before = (out.read_bytes(), manifest_path(out).read_text())

    with pytest.raises(ConversionError, match=r"split 'train' \(now 'val'\).*keep\.manifest\.json.*--force"):
        convert(src, out, split="val", params=p, workers=1, verbose=False)
    with pytest.raises(ConversionError, match=r"fraction None \(now 0\.5\).*--force"):  # a subset of it
        convert(src, out, split="train", params=p, fraction=0.5, workers=1, verbose=False)
    with pytest.raises(ConversionError, match=r"source_type 'imagefolder' \(now 'unlabelled'\)"):
        convert(src, out, source="unlabelled", split="train", params=p, workers=1, verbose=False)
    rc = main(["convert", str(src), str(out), "--split", "val", "--write-mode", "raw", "--max-res", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and str(out) in err and "split 'train' (now 'val')" in err and "--force" in err, err
    assert (out.read_bytes(), manifest_path(out).read_text()) == before  # nothing lost

    m = convert(src, out, split="val", params=p, workers=1, verbose=False, force=True)
    assert m["split"] == "val" and read_manifest(out)["source"] == str((src / "val").resolve())


def test_the_same_source_with_changed_files_or_write_settings_still_reconverts_without_force(tmp_path, capsys):
    src = _split_tree(tmp_path / "img")
    out = tmp_path / "t.beton"
    p = WriteParams(write_mode="raw", max_resolution=8)
    convert(src, out, split="train", params=p, workers=1, verbose=False)
    convert(src, out, split="train", params=p, workers=1)
    assert "up to date" in capsys.readouterr().out
    Image.new("RGB", (8, 6), (1, 2, 3)).save(src / "train" / "a" / "new.png")
    assert convert(src, out, split="train", params=p, workers=1, verbose=False)["num_images"] == 5
    m = convert(src, out, split="train", params=WriteParams(max_resolution=4), workers=1, verbose=False)
    assert m["write_params"]["write_mode"] == "jpg" and m["write_params"]["max_resolution"] == 4


def test_a_moved_source_folder_converts_again_without_force(tmp_path):
    """`sslray demo` after its data dir moved (or a CI cache restored elsewhere): the recorded source is
    gone and the folder is the same by name, so the same data converts again; it has no --force."""
    import shutil

    src = _split_tree(tmp_path / "a" / "img")
    out = tmp_path / "t.beton"
    p = WriteParams(write_mode="raw", max_resolution=8)
    convert(src, out, split="train", params=p, workers=1, verbose=False)
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    m = convert(tmp_path / "b" / "img", out, split="train", params=p, workers=1, verbose=False)
    assert m["source"] == str((tmp_path / "b" / "img" / "train").resolve())
    other = _split_tree(tmp_path / "c" / "img")  # the old source is there: another folder is another dataset
    with pytest.raises(ConversionError, match="--force"):
        convert(other, out, split="train", params=p, workers=1, verbose=False)


def test_an_existing_beton_without_manifest_or_a_folder_is_not_replaced_without_force(tmp_path, capsys):
    """A .beton written by ffcv itself, or one whose manifest was removed, says nothing of what it holds:
    converting onto it needs --force, and the file is untouched without it."""
    from sslray.cli import main

    src = _split_tree(tmp_path / "img")
    out = tmp_path / "other.beton"
    out.write_bytes(b"written by another tool")
    p = WriteParams(write_mode="raw", max_resolution=8)
    with pytest.raises(ConversionError, match=r"other\.beton exists and has no manifest.*--force"):
        convert(src, out, split="train", params=p, workers=1, verbose=False)
    rc = main(["convert", str(src), str(out), "--split", "train", "--write-mode", "raw", "--max-res", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no manifest" in err, err
    assert out.read_bytes() == b"written by another tool" and not manifest_path(out).exists()
    m = convert(src, out, split="train", params=p, workers=1, verbose=False, force=True)
    assert m["num_images"] == 4 and out.stat().st_size == m["beton_bytes"]

    folder = tmp_path / "dir.beton"
    folder.mkdir()
    with pytest.raises(ConversionError, match=r"dir\.beton is a folder"):
        convert(src, folder, split="train", params=p, workers=1, force=True, verbose=False)


def test_a_dying_image_check_process_is_a_named_error(tmp_path, monkeypatch):
    """A checking process killed from outside (the OOM killer) broke the pool with a bare
    BrokenProcessPool traceback; it is a ConversionError that says what to try."""
    import importlib
    import os

    conv = importlib.import_module("sslray.datasets.convert")  # the package's `convert` is the function

    root = tmp_path / "img" / "a"
    root.mkdir(parents=True)
    for i in range(260):  # over the 256 images below which the check runs in this process
        Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(root / f"{i}.png")
    monkeypatch.setattr(conv, "load_record", lambda rec, *a, **k: os._exit(9))  # seen by the forked workers
    out = tmp_path / "t.beton"
    with pytest.raises(ConversionError, match=r"process checking the images died.*--workers 1"):
        convert(tmp_path / "img", out, params=WriteParams(max_resolution=8), workers=2, verbose=False)
    assert not out.exists() and not list(tmp_path.glob(".t.beton*"))


def test_outputs_kept_beside_the_splits_are_not_splits_and_new_classes_need_force(tmp_path, capsys):
    """Working in the folder that holds train/ and test/: sslray's own outputs (runs/<name>/...,
    mlartifacts/<id>/<run>/...) became "splits" whose sub-folders were classes, and the same convert
    command that had said "up to date" re-converted train.beton with 27 classes and renumbered labels.
    Only folders whose class folders hold images are splits; a changed class list needs --force."""
    src = _split_tree(tmp_path / "img")
    out = tmp_path / "t.beton"
    p = WriteParams(write_mode="raw", max_resolution=8)
    first = convert(src, out, split="train", params=p, workers=1, verbose=False)
    assert first["classes"] == ["a", "b"]
    for junk in ("runs/c10-local/epoch_0001", "runs/c10-local/pictures", "mlartifacts/1/abc/artifacts"):
        (src / junk).mkdir(parents=True)
    Image.new("RGB", (8, 6)).save(src / "runs" / "c10-local" / "pictures" / "views.png")  # 3 levels down
    (src / "runs" / "c10-local" / "sslray_run.json").write_text("{}")
    convert(src, out, split="train", params=p, workers=1)
    assert "up to date" in capsys.readouterr().out

    (src / "train" / "c").mkdir()  # a new class folder: every label after it would move
    Image.new("RGB", (8, 6), (1, 2, 3)).save(src / "train" / "c" / "0.png")
    with pytest.raises(ConversionError, match=r"2 classes \(now 3: added c; the labels would be renumbered\).*--force"):
        convert(src, out, split="train", params=p, workers=1, verbose=False)
    assert read_manifest(out)["classes"] == ["a", "b"]
    again = convert(src, out, split="train", params=p, workers=1, verbose=False, force=True)
    assert again["classes"] == ["a", "b", "c"]
