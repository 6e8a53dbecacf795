"""``sslray convert --square`` (crop / pad / squash) and the ``OUT.paths.txt`` sidecar (row i -> file)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from sslray.datasets import WriteParams, convert, manifest_path, read_manifest
from sslray.datasets.convert import (PAD_RGB, ConversionError, load_record, paths_path, source_paths, square_mode,
                                     to_rgb_array)
from sslray.datasets.sources import Record

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


def _bands(w=64, h=32) -> Image.Image:
    """Red left quarter, green middle half, blue right quarter: the loader's centre square of the
    image as it is (crop) holds only the green."""
    a = np.empty((h, w, 3), np.uint8)
    a[:] = GREEN
    a[:, : w // 4] = RED
    a[:, w - w // 4:] = BLUE
    return Image.fromarray(a)


def _read(beton):
    """Every row of ``beton`` (one image size per file) and its label."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(str(beton), batch_size=16, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]})
    xs, ys = zip(*[(x.numpy().copy(), y.numpy().reshape(-1).copy()) for x, y in loader])
    return np.concatenate(xs), np.concatenate(ys)


def _centre(img: np.ndarray) -> np.ndarray:
    """The centre square the loader's decoder (CenterCropRGBImageDecoder, ratio 1) resizes to decode_res."""
    h, w = img.shape[:2]
    s = min(h, w)
    return img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def _has(img: np.ndarray, colour) -> bool:
    return bool((np.abs(img.astype(int) - colour).max(axis=-1) <= 2).any())


# --- the three modes -------------------------------------------------------------------------------

def test_pad_and_squash_keep_both_sides_that_crop_loses(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    _bands().save(tmp_path / "src" / "a" / "wide.png")
    seen = {}
    for mode in ("crop", "pad", "squash"):
        out = tmp_path / f"{mode}.beton"
        m = convert(tmp_path / "src", out, params=WriteParams(write_mode="raw", max_resolution=64, square=mode),
                    workers=1, verbose=False)
        assert square_mode(m) == mode == m["settings"]["square"] == read_manifest(out)["write_params"]["square"]
        seen[mode] = _read(out)[0][0]
    crop, pad, squash = (seen[k] for k in ("crop", "pad", "squash"))
    assert crop.shape == (32, 64, 3) and np.array_equal(crop, np.asarray(_bands()))  # crop: stored as it was
    assert not _has(_centre(crop), RED) and not _has(_centre(crop), BLUE)  # ... and the loader drops the bands
    for mode in ("pad", "squash"):
        assert _has(_centre(seen[mode]), RED) and _has(_centre(seen[mode]), BLUE), mode
    assert pad.shape == (64, 64, 3)
    assert np.array_equal(pad[16:48], np.asarray(_bands()))  # the whole image, centred
    assert (pad[:16] == PAD_RGB).all() and (pad[48:] == PAD_RGB).all()  # letterbox borders: the pad colour
    assert squash.shape == (64, 64, 3)
    assert np.array_equal(squash, np.asarray(_bands(64, 64)))  # stretched 2x in height, bands in place
    # splits made two ways are named before training (the probes would compare two kinds of image)
    from sslray.datasets.loader import dataset_info, square_note

    infos = {mode: dataset_info(str(tmp_path / f"{mode}.beton")) for mode in ("crop", "pad")}
    assert [i.square for i in infos.values()] == ["crop", "pad"]
    note = square_note(infos["pad"], infos["crop"])
    assert "--square pad" in note and "--square crop" in note and "pad.beton" in note
    assert square_note(infos["pad"], infos["pad"]) is None and square_note(infos["pad"], None) is None


def test_crop_is_the_image_as_before_and_squares_are_the_same_in_every_mode(tmp_path):
    """crop (the default) writes what conversion always wrote: the image, its longest side bounded by
    bilinear downscaling. A square image is written byte for byte the same in all three modes."""
    big = _bands(300, 100).convert("RGB")
    assert np.array_equal(to_rgb_array(big, 64), np.asarray(big.resize((64, 21), Image.BILINEAR)))
    assert to_rgb_array(_bands(300, 100), 64, "squash").shape == (64, 64, 3)  # bound and aspect in one resize
    assert to_rgb_array(_bands(300, 100), 64, "pad").shape == (64, 64, 3)
    assert WriteParams().square == "crop"

    rng = np.random.default_rng(0)
    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "src" / "a" / "small.png")
    Image.fromarray(rng.integers(0, 256, (90, 90, 3), dtype=np.uint8)).save(tmp_path / "src" / "a" / "big.png")
    Image.new("RGBA", (30, 30), (9, 90, 200, 128)).save(tmp_path / "src" / "a" / "alpha.png")
    written = {}
    for mode in ("crop", "pad", "squash"):
        out = tmp_path / f"{mode}.beton"
        convert(tmp_path / "src", out, params=WriteParams(max_resolution=32, square=mode), workers=1, verbose=False)
        written[mode] = out.read_bytes()
    assert written["pad"] == written["crop"] == written["squash"]


def test_another_square_mode_converts_again_and_older_manifests_read_as_crop(tmp_path, capsys):
    (tmp_path / "src" / "a").mkdir(parents=True)
    _bands().save(tmp_path / "src" / "a" / "wide.png")
    out = tmp_path / "t.beton"
    convert(tmp_path / "src", out, params=WriteParams(write_mode="raw", max_resolution=64), workers=1, verbose=False)
    m = convert(tmp_path / "src", out, params=WriteParams(write_mode="raw", max_resolution=64, square="pad"),
                workers=1, verbose=False)  # a write setting, as --max-res: no --force needed
    assert square_mode(m) == "pad" and _read(out)[0].shape == (1, 64, 64, 3)
    m = convert(tmp_path / "src", out, params=WriteParams(write_mode="raw", max_resolution=64), workers=1,
                verbose=False)
    assert square_mode(m) == "crop" and _read(out)[0].shape == (1, 32, 64, 3)

    # A manifest from before --square (no such key, and no paths list): it cropped, so it is up to date
    # for crop, and the rerun adds the missing paths list without converting again.
    mp = manifest_path(out)
    old = json.loads(mp.read_text())
    del old["settings"]["square"], old["write_params"]["square"], old["paths_root"]
    mp.write_text(json.dumps(old))
    lines = paths_path(out).read_text()
    paths_path(out).unlink()
    mtime = out.stat().st_mtime_ns
    assert square_mode(old) == "crop"
    convert(tmp_path / "src", out, params=WriteParams(write_mode="raw", max_resolution=64), workers=1)
    assert "up to date" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == mtime and paths_path(out).read_text() == lines == "a/wide.png\n"
    assert read_manifest(out)["paths_root"] == str(tmp_path / "src")  # what the lines are relative to
    with pytest.raises(ConversionError, match="--square 'fill' is not one of crop, pad, squash"):
        convert(tmp_path / "src", out, params=WriteParams(square="fill"), workers=1, verbose=False)


def test_cli_square_flag(tmp_path):
    from sslray.cli import main

    (tmp_path / "src" / "a").mkdir(parents=True)
    _bands().save(tmp_path / "src" / "a" / "wide.png")
    out = tmp_path / "t.beton"
    assert main(["convert", str(tmp_path / "src"), str(out), "--square", "squash", "--workers", "1"]) == 0
    assert square_mode(read_manifest(out)) == "squash" and _read(out)[0].shape == (1, 64, 64, 3)


# --- OUT.paths.txt -----------------------------------------------------------------------------------

def _colour(i: int) -> tuple[int, int, int]:
    return (10 * i % 256, 255 - 7 * i % 256, 40)


def _check_rows(out, root, expect_label):
    """Line i of the paths list names the file of row i: same label, same pixels."""
    images, labels = _read(out)
    lines = source_paths(out)
    assert lines is not None and len(lines) == len(images) == read_manifest(out)["num_images"]
    assert read_manifest(out)["paths_root"] == str(root.resolve())
    for i, line in enumerate(lines):
        f = root / line
        assert labels[i] == expect_label(f), (i, line)
        assert np.array_equal(images[i], np.asarray(Image.open(f).convert("RGB"))), (i, line)
    return lines


def test_paths_list_follows_the_row_order_of_an_imagefolder(tmp_path):
    src = tmp_path / "src"
    n = 0
    for cls in ("b", "a", "c"):
        (src / cls).mkdir(parents=True)
        for k in (3, 1, 2, 10):  # listed in sorted order: 1, 10, 2, 3
            Image.new("RGB", (12, 8), _colour(n)).save(src / cls / f"{k}.png")
            n += 1
    (src / "a" / "2.png").write_bytes(b"")  # skipped: every later row moves up one
    out = tmp_path / "t.beton"
    m = convert(src, out, params=WriteParams(write_mode="raw", max_resolution=16), workers=1, verbose=False)
    assert m["num_skipped"] == 1 and paths_path(out) == tmp_path / "t.paths.txt"
    lines = _check_rows(out, src, lambda f: m["classes"].index(f.parent.name))
    assert lines[:4] == ["a/1.png", "a/10.png", "a/3.png", "b/1.png"]


def test_paths_list_of_csv_and_unlabelled_sources(tmp_path):
    imgs = tmp_path / "data"
    (imgs / "x" / "y").mkdir(parents=True)
    names = ["x/y/p.png", "x/q.png", "r.png", "x/y/a.png"]
    for i, name in enumerate(names):
        Image.new("RGB", (10, 6), _colour(i)).save(imgs / name)
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (10, 6), _colour(9)).save(outside)

    lst = imgs / "list.csv"  # rows in their own order, one path outside the CSV's folder
    rows = [("x/q.png", "cat"), (str(outside), "dog"), ("x/y/p.png", "dog"), ("r.png", "")]
    with open(lst, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    out = tmp_path / "c.beton"
    m = convert(lst, out, source="csv", params=WriteParams(write_mode="raw", max_resolution=16), workers=1,
                verbose=False)
    label_of = {str((imgs / p).resolve()): lab for p, lab in rows}
    lines = _check_rows(out, imgs, lambda f: m["classes"].index(label_of[str(f.resolve())])
                        if label_of[str(f.resolve())] else -1)
    assert lines == ["x/q.png", str(outside.resolve()), "x/y/p.png", "r.png"]

    (lst).unlink()
    out = tmp_path / "u.beton"
    convert(imgs, out, source="unlabelled", params=WriteParams(write_mode="raw", max_resolution=16), workers=1,
            verbose=False)
    assert _check_rows(out, imgs, lambda f: -1) == ["r.png", "x/q.png", "x/y/a.png", "x/y/p.png"]


def test_pickle_batch_rows_are_named_by_file_and_index(tmp_path):
    from sslray.datasets.sidecars import path_lines

    root = tmp_path / "cifar-10-batches-py"
    recs = [Record(f"{root}/data_batch_1#{i}", 0, object()) for i in (0, 1)] + [Record("/x/y\nz.png", 0)]
    assert path_lines(recs[:2], root) == ["data_batch_1#0", "data_batch_1#1"]
    assert path_lines(recs, root) is None  # a line break cannot be written one path per line


def test_no_paths_list_is_left_by_a_failed_conversion(tmp_path, monkeypatch):
    import importlib
    import os

    import ffcv.writer

    conv = importlib.import_module("sslray.datasets.convert")  # the package's `convert` is the function

    (tmp_path / "src" / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (6, 4), _colour(i)).save(tmp_path / "src" / "a" / f"{i}.png")
    p = WriteParams(write_mode="raw", max_resolution=8)
    out = tmp_path / "o" / "t.beton"

    real = ffcv.writer.DatasetWriter.from_indexed_dataset
    monkeypatch.setattr(ffcv.writer.DatasetWriter, "from_indexed_dataset",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("simulated crash")))
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert(tmp_path / "src", out, params=p, workers=1, verbose=False)
    assert list(out.parent.iterdir()) == [] and source_paths(out) is None

    monkeypatch.setattr(ffcv.writer.DatasetWriter, "from_indexed_dataset", real)
    convert(tmp_path / "src", out, params=p, workers=1, verbose=False)
    assert source_paths(out) == ["a/0.png", "a/1.png", "a/2.png"]
    Image.new("RGB", (6, 4), _colour(7)).save(tmp_path / "src" / "a" / "00.png")  # a new first row

    real_replace = os.replace

    def crash_at_paths(src, dst):  # killed after the new .beton took OUT's place
        if str(dst).endswith(".paths.txt"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(conv.os, "replace", crash_at_paths)
    with pytest.raises(OSError, match="simulated crash"):
        convert(tmp_path / "src", out, params=p, workers=1, verbose=False)
    # The old list would name the wrong file for every row: gone, with the manifest (unfinished).
    assert sorted(f.name for f in out.parent.iterdir()) == ["t.beton"]
    monkeypatch.setattr(conv.os, "replace", real_replace)
    convert(tmp_path / "src", out, params=p, workers=1, verbose=False, force=True)  # unfinished: --force
    assert source_paths(out) == ["a/0.png", "a/00.png", "a/1.png", "a/2.png"]

    paths_path(out).write_text("a/0.png\n")  # not from this conversion
    with pytest.raises(ConversionError, match=r"t\.paths\.txt lists 1 paths but .*t\.manifest\.json counts 4"):
        source_paths(out)


# --- real images -----------------------------------------------------------------------------------

def test_square_modes_on_real_imagenette_images(tmp_path_factory):
    """Real Imagenette photos (224 x 224, so every mode writes the same bytes), and non-square cuts
    of them: pad holds the crop's pixels between the borders; squash, resized back, is close to them."""
    from conftest import IMAGENETTE_ARCHIVE
    from test_sources import extract_subset

    root = extract_subset(IMAGENETTE_ARCHIVE, tmp_path_factory.mktemp("imagenette"), {"val": 3}) / "val"
    written = {}
    for mode in ("crop", "pad", "squash"):
        out = tmp_path_factory.mktemp(mode) / "v.beton"
        m = convert(root, out, params=WriteParams(max_resolution=224, square=mode), workers=1, verbose=False)
        assert m["num_images"] == 30 and m["max_width"] == m["max_height"] == 224
        written[mode] = out.read_bytes()
    assert written["pad"] == written["crop"] == written["squash"]
    assert len(source_paths(out)) == 30 and all((root / line).is_file() for line in source_paths(out))

    cuts = tmp_path_factory.mktemp("cuts")
    for i, f in enumerate(sorted(root.glob("*/*"))[:10]):
        box = (0, 37, 224, 187) if i % 2 else (50, 0, 150, 224)  # wide 224 x 150, tall 100 x 224
        Image.open(f).convert("RGB").crop(box).save(cuts / f"{i}.png")
    for f in sorted(cuts.iterdir()):
        rec = Record(str(f), 0)
        crop, pad, squash = (load_record(rec, 224, square=mode) for mode in ("crop", "pad", "squash"))
        h, w = crop.shape[:2]
        top, left = (224 - h) // 2, (224 - w) // 2
        assert pad.shape == squash.shape == (224, 224, 3)
        assert np.array_equal(pad[top:top + h, left:left + w], crop)
        border = np.ones((224, 224), bool)
        border[top:top + h, left:left + w] = False
        assert (pad[border] == PAD_RGB).all()
        back = np.asarray(Image.fromarray(squash).resize((w, h), Image.BILINEAR)).astype(float)
        assert np.abs(back - crop).mean() < 6, f.name  # the same picture, stretched and back
