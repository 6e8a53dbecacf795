"""Bad input: every image is converted correctly or listed in manifest.skipped with its path and
reason; --strict turns a skip into a non-zero exit naming the file. One test per case."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslray.cli import main
from sslray.datasets import ConversionError, SourceError, WriteParams, convert, read_manifest
from sslray.datasets.loader import read_image

RAW = WriteParams(write_mode="raw", max_resolution=256)


def good_image(size=(40, 30), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def tree(root: Path, bad: dict[str, bytes | Image.Image | None], n_good: int = 2) -> Path:
    """``root/a/`` holds ``n_good`` good JPEGs; ``root/b/`` the files in ``bad`` (bytes, an image
    saved by its extension, or None for an empty folder)."""
    (root / "a").mkdir(parents=True)
    for i in range(n_good):
        good_image(seed=i).save(root / "a" / f"good{i}.jpg", quality=90)
    (root / "b").mkdir()
    for name, content in bad.items():
        if content is None:
            continue
        p = root / "b" / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            content.save(p)
    return root


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["convert", *map(str, args), "--workers", "1"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def skipped_reason(manifest: dict, name: str) -> str:
    hits = [s["reason"] for s in manifest["skipped"] if Path(s["path"]).name == name]
    assert hits, f"{name} not in skipped: {manifest['skipped']}"
    return hits[0]


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_truncated_jpeg_is_skipped_and_strict_names_it(tmp_path, capsys):
    data = jpeg_bytes(good_image((200, 200)))
    src = tree(tmp_path / "src", {"cut.jpg": data[: len(data) // 2]})
    out = tmp_path / "o.beton"
    rc, stdout, _ = run_cli(capsys, src, out)
    assert rc == 0
    m = read_manifest(out)
    assert m["num_images"] == 2 and m["num_skipped"] == 1
    assert "truncated" in skipped_reason(m, "cut.jpg")
    assert "2 images converted, 1 skipped" in stdout and "cut.jpg" in stdout
    rc, _, err = run_cli(capsys, src, tmp_path / "s.beton", "--strict")
    assert rc != 0 and "cut.jpg" in err and "--strict" in err
    assert not (tmp_path / "s.beton").exists()


def test_text_file_named_jpg(tmp_path, capsys):
    src = tree(tmp_path / "src", {"notes.jpg": b"this is not an image\n" * 10})
    rc, stdout, _ = run_cli(capsys, src, tmp_path / "o.beton")
    m = read_manifest(tmp_path / "o.beton")
    assert rc == 0 and m["num_images"] == 2
    assert "not an image" in skipped_reason(m, "notes.jpg")
    assert "skipped by reason: 1 not an image" in stdout


def test_zero_byte_file(tmp_path, capsys):
    src = tree(tmp_path / "src", {"empty.png": b""})
    rc, _, _ = run_cli(capsys, src, tmp_path / "o.beton")
    m = read_manifest(tmp_path / "o.beton")
    assert rc == 0 and "empty file (0 bytes)" in skipped_reason(m, "empty.png")
    rc, _, err = run_cli(capsys, src, tmp_path / "s.beton", "--strict")
    assert rc == 2 and "empty.png" in err


def test_cmyk_jpeg_converts_with_the_right_colours(tmp_path):
    red = Image.new("RGB", (24, 24), (220, 30, 30)).convert("CMYK")
    src = tree(tmp_path / "src", {"cmyk.jpg": red}, n_good=0)
    m = convert(src, tmp_path / "o.beton", params=RAW, workers=1, verbose=False)
    assert m["num_images"] == 1 and m["num_skipped"] == 0
    img, label = read_image(str(tmp_path / "o.beton"), 0)
    assert label == 1 and img.shape == (24, 24, 3)
    np.testing.assert_allclose(img.reshape(-1, 3).mean(0), (220, 30, 30), atol=12)


@pytest.mark.parametrize("kind", ["RGBA", "P", "I;16"])
def test_rgba_palette_and_16bit_png(kind, tmp_path):
    if kind == "RGBA":
        img = Image.new("RGBA", (16, 16), (0, 0, 255, 0))  # fully transparent blue: white over a white bg
        want = (255, 255, 255)
    elif kind == "P":
        img = Image.new("RGB", (16, 16), (0, 200, 0)).convert("P", palette=Image.ADAPTIVE, colors=4)
        want = (0, 200, 0)
    else:
        img = Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16))  # mid grey on 16 bits
        want = (128, 128, 128)
    src = tree(tmp_path / "src", {"x.png": img}, n_good=0)
    if kind == "I;16":
        assert Image.open(src / "b" / "x.png").mode in ("I;16", "I")  # really a 16-bit PNG on disk
    m = convert(src, tmp_path / "o.beton", params=RAW, workers=1, verbose=False)
    assert m["num_images"] == 1 and m["num_skipped"] == 0
    np.testing.assert_allclose(read_image(str(tmp_path / "o.beton"), 0)[0].reshape(-1, 3).mean(0), want, atol=2)


def test_greyscale_becomes_three_equal_channels(tmp_path):
    grey = Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (10, 1)), "L")
    src = tree(tmp_path / "src", {"g.png": grey}, n_good=0)
    convert(src, tmp_path / "o.beton", params=RAW, workers=1, verbose=False)
    img = read_image(str(tmp_path / "o.beton"), 0)[0]
    assert img.shape == (10, 32, 3)
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
    np.testing.assert_array_equal(img[..., 0], np.asarray(grey))


def test_one_pixel_image(tmp_path):
    src = tree(tmp_path / "src", {"dot.png": Image.new("RGB", (1, 1), (10, 20, 30))}, n_good=0)
    m = convert(src, tmp_path / "o.beton", params=RAW, workers=1, verbose=False)
    assert m["num_images"] == 1
    np.testing.assert_array_equal(read_image(str(tmp_path / "o.beton"), 0)[0], [[[10, 20, 30]]])


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_very_large_image_is_resized_by_max_res(fmt, tmp_path, capsys):
    big = good_image((6000, 4000), seed=3)  # 24 MP; the stored copy must be 300 x 200
    src = tree(tmp_path / "src", {f"big.{fmt}": big}, n_good=1)
    out = tmp_path / "o.beton"
    rc, _, _ = run_cli(capsys, src, out, "--max-res", "300", "--write-mode", "raw")
    m = read_manifest(out)
    assert rc == 0 and m["num_images"] == 2 and m["max_width"] == 300 and m["max_height"] == 200
    shapes = sorted(read_image(str(out), i)[0].shape for i in range(2))
    assert shapes == [(30, 40, 3), (200, 300, 3)]


def test_empty_class_folder_is_kept_and_noted(tmp_path, capsys):
    src = tree(tmp_path / "src", {"unused": None})
    (src / "c").mkdir()
    good_image().save(src / "c" / "x.jpg")
    rc, stdout, _ = run_cli(capsys, src, tmp_path / "o.beton")
    m = read_manifest(tmp_path / "o.beton")
    assert rc == 0 and m["classes"] == ["a", "b", "c"] and m["class_counts"]["b"] == 0
    assert any("holds no images" in n and n.rstrip().split()[2].endswith("b") for n in m["notes"])
    assert "holds no images" in stdout


def _in100(root: Path) -> Path:
    for split in ("train.X1", "val.X"):
        (root / split / "n01").mkdir(parents=True)
        good_image().save(root / split / "n01" / "a.JPEG")
    return root


def test_missing_labels_json_warns_and_keeps_wnids(tmp_path, capsys):
    src = _in100(tmp_path / "in100")
    with pytest.warns(UserWarning, match="Labels.json"):
        rc, stdout, _ = run_cli(capsys, src, tmp_path / "o.beton", "--source", "imagenet100")
    m = read_manifest(tmp_path / "o.beton")
    assert rc == 0 and m["classes"] == ["n01"] and m["class_names"] == {}
    assert "Labels.json not found" in stdout  # the summary repeats the note


@pytest.mark.parametrize("content", ["{not json", '["n01", "tench"]', '{"n01": 3}'])
def test_malformed_labels_json_is_an_error_naming_the_file(content, tmp_path, capsys):
    src = _in100(tmp_path / "in100")
    (src / "Labels.json").write_text(content)
    rc, _, err = run_cli(capsys, src, tmp_path / "o.beton", "--source", "imagenet100")
    assert rc == 2 and str(src / "Labels.json") in err
    assert not (tmp_path / "o.beton").exists()


def test_source_path_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    for source in ("imagefolder", "imagenet100", "cifar10", "unlabelled", "csv"):
        rc, _, err = run_cli(capsys, missing, tmp_path / "o.beton", "--source", source)
        assert rc == 2 and f"{missing} does not exist" in err, (source, err)
    with pytest.raises(SourceError, match="does not exist"):
        convert(missing, tmp_path / "o.beton", verbose=False)


def test_unwritable_output_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib

    C = importlib.import_module("sslray.datasets.convert")  # the module, not the function of that name

    src = tree(tmp_path / "src", {})
    blocker = tmp_path / "file"
    blocker.write_text("a regular file where a folder should be")  # root can write anywhere else

    def no_work(*a, **k):
        raise AssertionError("images were read before the output was checked")

    monkeypatch.setattr(C, "validate", no_work)
    monkeypatch.setattr(C, "SOURCES", None)  # not even the listing may run
    for out in (blocker / "o.beton", blocker / "sub" / "o.beton"):
        rc, _, err = run_cli(capsys, src, out)
        assert rc == 2 and str(blocker) in err and ("not writable" in err or "cannot create" in err), err
    with pytest.raises(ConversionError):
        convert(src, blocker / "o.beton", verbose=False)


def test_mixed_bad_files_summary_counts_every_reason(tmp_path, capsys):
    data = jpeg_bytes(good_image((100, 100)))
    src = tree(tmp_path / "src", {"cut.jpg": data[:300], "t.jpg": b"text", "z.jpg": b"", "readme.txt": b"hi"})
    rc, stdout, _ = run_cli(capsys, src, tmp_path / "o.beton")
    m = read_manifest(tmp_path / "o.beton")
    assert rc == 0 and m["num_images"] == 2 and m["num_skipped"] == 4
    assert sum(m["skipped_reasons"].values()) == 4
    assert {Path(s["path"]).name for s in m["skipped"]} == {"cut.jpg", "t.jpg", "z.jpg", "readme.txt"}
    assert "2 images converted, 4 skipped" in stdout and "skipped by reason" in stdout
    json.dumps(m)  # the manifest stays plain JSON


def test_pretrain_on_a_missing_dataset_fails_before_ray_starts(tmp_path, monkeypatch, capsys):
    """A mistyped --data used to start Ray, its workers and an MLflow run, and fail in the workers ~50 s
    later with a traceback per worker. With the workers on this machine it now fails at once."""
    import ray

    import sslray.raytrain.trainer as T

    # the session's shared Ray instance may be up in this process: the check must see none, as a fresh CLI would
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    started = []

    def ensure_ray(*a, **k):  # stands for starting Ray: the test ends there
        started.append(1)
        raise SystemExit(9)

    monkeypatch.setattr(T, "ensure_ray", ensure_ray)
    monkeypatch.setattr(T, "local_head", lambda *a, **k: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    val = tmp_path / "val.beton"
    val.write_bytes(b"")
    args = ["pretrain", "--recipe", "smoke", "--data", str(tmp_path / "trian.beton"), "--val", str(val),
            "--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert f"data.train={tmp_path / 'trian.beton'}" in err and "data.val" not in err and not started
    assert not (tmp_path / "m.db").exists()  # no MLflow run was opened for it

    # A dead head's file: sslray starts a local Ray, so the workers run here and the file is still refused.
    from sslray.rayhead import LocalHead

    monkeypatch.setattr(T, "local_head", lambda *a, **k: LocalHead("/tmp/ray/ray_current_cluster", "127.0.0.1:1",
                                                                   "Connection refused"))
    assert main(args) != 0 and not started
    assert f"data.train={tmp_path / 'trian.beton'}" in capsys.readouterr().err

    # On a cluster the workers may have files this machine lacks: a note, then Ray as before.
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(SystemExit):
        main(args)
    assert started and "not found on this machine; the cluster's workers must have it" in capsys.readouterr().out


# --- write settings, a dying writer, not-a-CSV, a split tree without --split (review findings 1, 13) ---


@pytest.mark.parametrize("flag,value,says", [
    ("--max-res", "0", "--max-res must be a positive number of pixels, got 0"),
    ("--max-res", "-8", "--max-res must be a positive number of pixels, got -8"),
    ("--quality", "500", "--quality must be a JPEG quality in [0, 100], got 500"),
    ("--quality", "-1", "--quality must be a JPEG quality in [0, 100], got -1"),
    ("--compress-probability", "7", "--compress-probability must be a probability in [0, 1], got 7.0"),
    ("--workers", "-2", "--workers must be >= 0"),
])
def test_write_settings_out_of_range_fail_before_any_work(flag, value, says, tmp_path, capsys, monkeypatch):
    """--max-res 0 used to hang for ever (the writer's worker died in cv2.resize) and leave
    .X.beton.partial-<pid> files; --quality 500 and --compress-probability 7 were accepted."""
    import importlib

    C = importlib.import_module("sslray.datasets.convert")
    src = tree(tmp_path / "src", {})
    outdir = tmp_path / "out"
    outdir.mkdir()

    def no_work(*a, **k):
        raise AssertionError("images were read before the write settings were checked")

    monkeypatch.setattr(C, "validate", no_work)
    monkeypatch.setattr(C, "SOURCES", None)  # not even the listing may run
    rc = main(["convert", str(src), str(outdir / "o.beton"), flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and says in err, err
    assert list(outdir.iterdir()) == []
    if flag != "--workers":
        key = {"--max-res": "max_resolution", "--quality": "jpeg_quality",
               "--compress-probability": "compress_probability"}[flag]
        with pytest.raises(ConversionError, match=flag):
            convert(src, outdir / "o.beton", params=WriteParams(**{key: float(value)}), verbose=False)


_DYING_WRITER = """
import importlib, os, signal, sys
from pathlib import Path
C = importlib.import_module("sslray.datasets.convert")
real_validate = C.validate

def validate(records, *a, **k):  # the check passes, then the writer's processes fail
    result = real_validate(records, *a, **k)
    if sys.argv[1] == "removed":
        Path(records[1].path).unlink()
    else:
        C.load_record = lambda rec, *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    return result

C.validate = validate
try:
    C.convert(sys.argv[2], sys.argv[3], workers=2, verbose=False)
except C.ConversionError as e:
    print("ConversionError:", e)
    sys.exit(3)
"""


@pytest.mark.parametrize("how", ["removed", "killed"])
def test_a_writer_process_that_dies_ends_the_conversion_instead_of_hanging(how, tmp_path):
    """FFCV's writer waited for ever when one of its processes died (an image removed since the check,
    the OOM killer). Run in a subprocess with a timeout so that a regression fails instead of hanging."""
    import subprocess
    import sys

    src = tree(tmp_path / "src", {})
    out = tmp_path / "out" / "h.beton"
    out.parent.mkdir()
    gone = sorted((src / "a").iterdir())[1]
    try:
        r = subprocess.run([sys.executable, "-c", _DYING_WRITER, how, str(src), str(out)], capture_output=True,
                           text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the conversion hung after a writer process died")
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"writing {out} failed" in r.stdout and f"nothing was written to {out}" in r.stdout, r.stdout
    if how == "removed":
        assert f"{gone} can no longer be read" in r.stdout and "FileNotFoundError" in r.stdout, r.stdout
    else:
        assert "killed by signal 9" in r.stdout, r.stdout
    assert list(out.parent.iterdir()) == []  # no .partial files, no manifest


def test_csv_source_that_is_not_text_names_the_file(tmp_path, capsys):
    """`convert pic.png x.beton --source csv` said only "'utf-8' codec can't decode byte 0x89"."""
    pic = tmp_path / "pic.png"
    good_image().save(pic)
    blob = tmp_path / "list.csv"
    blob.write_bytes(b"a.png,0\x00\x00\x01")
    for f in (pic, blob):
        rc, _, err = run_cli(capsys, f, tmp_path / "x.beton", "--source", "csv")
        assert rc == 2 and f"csv source {f}" in err and "text CSV of path,label rows" in err, err
        assert "codec" not in err
    assert "give the CSV that lists the images" in run_cli(capsys, pic, tmp_path / "x.beton", "--source", "csv")[2]
    assert not (tmp_path / "x.beton").exists()


def test_split_tree_without_split_suggests_one(tmp_path, capsys):
    """`convert img e.beton` on img/{train,val}/<class>/ said only "no readable images in img (0 skipped)"."""
    for split in ("train", "val"):
        tree(tmp_path / "img" / split, {"x.png": good_image()})
    rc, _, err = run_cli(capsys, tmp_path / "img", tmp_path / "e.beton")
    img = tmp_path / "img"
    assert rc == 2 and f"{img}/train and {img}/val hold only sub-folders: did you mean --split train?" in err, err
    with pytest.raises(SourceError, match="did you mean --split train"):
        convert(img, tmp_path / "e.beton", verbose=False)
    assert run_cli(capsys, img, tmp_path / "e.beton", "--split", "train")[0] == 0
