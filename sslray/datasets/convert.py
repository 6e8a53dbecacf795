"""Source -> FFCV ``.beton`` + ``.manifest.json``, atomically, and never losing an image silently.

Every record is decoded once up front (in parallel) so that a truncated, empty or mislabelled file
is listed in ``manifest["skipped"]`` with its reason instead of crashing the FFCV writer half way.
Only images that decoded become rows of the .beton. The .beton, its manifest and its source-paths
sidecar are written under temporary names and renamed at the end: a crash never leaves a file that
looks finished, nor a sidecar that describes another .beton.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm

from .. import __version__
from .sidecars import (ConversionError, backfill_paths, manifest_path, partial_name, path_lines, paths_path,
                       paths_root_of, read_manifest, source_paths, square_mode, write_lines)
from .sources import SOURCES, Record, SourceError, SourceListing, select

# Real datasets hold images larger than PIL's bomb guard; --max-res bounds what we keep instead.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error we report, never half an image

MANIFEST_VERSION = 1
WRITE_MODES = ("jpg", "raw", "proportion", "smart")
# How a non-square image becomes the square the loader decodes (its decoder takes the centre square):
# crop keeps the image as it is (the loader then drops the sides), pad letterboxes the whole image,
# squash resizes it to a square. See docs/datasets.md.
SQUARE_MODES = ("crop", "pad", "squash")
# pad's border: ImageNet's mean colour, so it normalises to about 0 (what the network's own zero
# padding looks like) and says nothing about the image. A per-image mean would give two views of one
# image the same flat patch to match on, a shortcut for contrastive and invariance losses.
PAD_RGB = (124, 116, 104)


@dataclass(frozen=True)
class WriteParams:
    write_mode: str = "jpg"
    max_resolution: int = 256  # longest side kept, px; bounds RAM at load time (see README)
    jpeg_quality: int = 90
    compress_probability: float = 0.5  # only for write_mode=proportion
    square: str = "crop"  # non-square images: crop (the loader's centre square), pad or squash

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def check(self) -> None:
        """Refuse settings the FFCV writer cannot honour, naming the ``sslray convert`` flag. A max
        resolution <= 0 made every writer process die in cv2.resize while the parent waited for ever."""
        if self.write_mode not in WRITE_MODES:
            raise ConversionError(f"write mode {self.write_mode!r} is not one of {', '.join(WRITE_MODES)}")
        if self.square not in SQUARE_MODES:
            raise ConversionError(f"--square {self.square!r} is not one of {', '.join(SQUARE_MODES)}")
        if not self.max_resolution > 0:
            raise ConversionError(f"--max-res must be a positive number of pixels, got {self.max_resolution}")
        if not 0 <= self.jpeg_quality <= 100:
            raise ConversionError(f"--quality must be a JPEG quality in [0, 100], got {self.jpeg_quality}")
        if not 0 <= self.compress_probability <= 1:
            raise ConversionError(f"--compress-probability must be a probability in [0, 1], "
                                  f"got {self.compress_probability}")


def to_rgb_array(img: Image.Image, max_res: int, square: str = "crop") -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8, longest side <= max_res. Alpha is composited over white.
    ``square`` pad / squash: a non-square image becomes a square of its (bounded) longest side, so
    no pixel along that side is lost; crop stores it as it is. A square image is the same in all three."""
    if img.format == "JPEG" and max_res and max(img.size) > 2 * max_res:
        img.draft("RGB", (max_res, max_res))  # let libjpeg decode at 1/2..1/8 scale: fast and small
    img.load()
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32 if mode == "I" else np.uint16)
        peak = 65535 if mode != "I" else max(int(arr.max()), 1)
        arr = (arr.astype(np.float64) * (255.0 / peak)).round().clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
        img = Image.fromarray(arr, "L")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    if square == "squash" and img.width != img.height:
        side = min(max(img.size), max_res) if max_res else max(img.size)
        img = img.resize((side, side), Image.BILINEAR)  # one resampling for both the bound and the aspect
    elif max_res and max(img.size) > max_res:
        scale = max_res / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    if square == "pad" and img.width != img.height:
        side = max(img.size)
        canvas = Image.new("RGB", (side, side), PAD_RGB)
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = canvas
    return np.asarray(img, dtype=np.uint8).copy()


def open_record(rec: Record) -> Image.Image:
    if rec.loader is not None:
        return rec.loader()
    if os.path.getsize(rec.path) == 0:
        raise ValueError("empty file (0 bytes)")
    return Image.open(rec.path)


def load_record(rec: Record, max_res: int, square: str = "crop") -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's EXIF/ICC chatter is not a data problem
        img = open_record(rec)
        try:
            return to_rgb_array(img, max_res, square)
        finally:
            img.close()


def _check(args: tuple[int, Record, int, str]) -> tuple[int, Optional[tuple[int, int]], Optional[str]]:
    i, rec, max_res, square = args
    try:
        arr = load_record(rec, max_res, square=square)
        return i, arr.shape[:2], None
    except Exception as e:  # every failure becomes a reason in the manifest
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if "cannot identify image file" in reason:
            reason = "not an image (cannot identify image file)"
        return i, None, reason


class _ValidDataset:
    """Indexed view of the validated records for FFCV's writer (picklable for its workers)."""

    def __init__(self, records: Sequence[Record], max_res: int, square: str = "crop"):
        self.records = list(records)
        self.max_res = max_res
        self.square = square

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        rec = self.records[i]
        try:
            return load_record(rec, self.max_res, square=self.square), int(rec.label)
        except Exception as e:  # it decoded during the check: changed or removed since
            raise ConversionError(f"{rec.path} can no longer be read ({type(e).__name__}: {e}); "
                                  "it was readable when the images were checked") from e


class WriterDied(RuntimeError):
    """A process of the FFCV writer died; the message says which error or signal ended it."""


def _report_errors(work_fn, errors, *args) -> None:
    """Runs one FFCV writer process; an exception is sent to the parent instead of a traceback."""
    import sys
    import traceback

    try:
        work_fn(*args)
    except Exception as e:  # the parent names it and stops the others
        if isinstance(e, ConversionError):  # ours: it names the file
            errors.put(str(e))
        else:
            where = traceback.extract_tb(e.__traceback__)[-1]
            errors.put(f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})")
        sys.exit(1)


def _supervised(DatasetWriter):
    """FFCV's ``DatasetWriter`` whose parent notices a dead worker. FFCV's own ``_write_common``
    waits until the workers have counted every sample: a worker that raised, or was killed (out of
    memory), left the parent waiting for ever. This is that method (ffcv 1.0.2) with the workers
    watched while the parent waits; the first failure stops the others and raises ``WriterDied``."""
    import ctypes
    import queue
    from multiprocessing import Process, Queue, Value
    from time import sleep

    from ffcv.memory_allocator import MemoryAllocator

    def failure(processes, errors) -> Optional[str]:
        dead = [p for p in processes if p.exitcode not in (None, 0)]
        if not dead:
            return None
        try:
            return errors.get(timeout=2)
        except queue.Empty:
            code = dead[0].exitcode
            return f"a writer process was killed by signal {-code}" + (" (out of memory?)" if code == -9 else "") \
                if code < 0 else f"a writer process exited with code {code}"

    class SupervisedWriter(DatasetWriter):
        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()
            workqueue: Queue = Queue()
            for todo in queue_content:
                workqueue.put(todo)
            for _ in range(self.num_workers):
                workqueue.put(None)  # one "no more work" token per worker
            allocations_queue: Queue = Queue()
            errors: Queue = Queue()
            done_number = Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            worker_args = (work_fn, errors, workqueue, self.metadata_sm, self.metadata_type, self.fields,
                           allocator, done_number, allocations_queue, *extra_worker_args)
            processes = [Process(target=_report_errors, args=worker_args) for _ in range(self.num_workers)]
            ok = False
            progress = tqdm(total=self.num_samples, desc="writing", unit="img")
            try:
                for p in processes:
                    p.start()
                previous = 0
                while previous != self.num_samples:
                    val = done_number.value
                    if val - previous > 0:
                        progress.update(val - previous)
                    previous = val
                    why = failure(processes, errors)
                    if why:
                        raise WriterDied(why)
                    sleep(0.1)
                allocation_list: list = []
                pending = len(processes)
                while pending:  # each worker sends its allocations as it exits
                    try:
                        allocation_list.extend(allocations_queue.get(timeout=0.5))
                        pending -= 1
                    except queue.Empty:
                        why = failure(processes, errors)
                        if why:
                            raise WriterDied(why)
                self.finalize(allocation_list)
                ok = True
            finally:
                progress.close()
                if not ok:  # work nobody will read: exiting must not wait to flush it into the pipe
                    workqueue.cancel_join_thread()
                for p in processes:
                    if not ok and p.is_alive():
                        p.terminate()
                    if p.pid is not None:
                        p.join(timeout=10)
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return SupervisedWriter


def check_writable(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConversionError(f"cannot create output folder {parent}: {e.strerror}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".sslray-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConversionError(f"output folder {parent} is not writable: {e.strerror}") from None


def check_same_origin(out: Path, old: dict, source: str, split: Optional[str], settings: dict,
                      classes: Optional[Sequence[str]] = None) -> None:
    """``out`` converted from another source, source type or split, or with another subset
    (``--classes``/``--fraction``/``--seed``, source options), holds a different dataset: it is only
    replaced with ``--force``, since a mistyped OUT must not destroy a conversion whose source may be
    gone. The same images with other write settings (``--max-res``, ``--quality``...), or the same
    source with changed files, convert again as before: that source is there to convert from."""
    diffs = []
    was = old.get("source")
    # A source folder that was moved (the old path is gone, the folder name is the same: a data dir
    # moved or restored elsewhere) is the same data: it converts again as a changed source would.
    moved = was is not None and not os.path.exists(was) and Path(was).name == Path(source).name
    if was not in (None, source) and not moved:
        diffs.append(f"source {was} (now {source})")
    if "split" in old and old["split"] != split:
        diffs.append(f"split {old['split']!r} (now {split!r})")
    if classes is not None and old.get("classes") is not None and list(old["classes"]) != list(classes):
        # New or removed class folders renumber the labels every checkpoint of the old data was
        # trained and probed with.
        changes = (("added", sorted(set(classes) - set(old["classes"]))),
                   ("removed", sorted(set(old["classes"]) - set(classes))))
        what = "; ".join(f"{verb} {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                         for verb, names in changes if names) or "in another order"
        diffs.append(f"{len(old['classes'])} classes (now {len(classes)}: {what}; the labels would be renumbered)")
    before = old.get("settings")
    if isinstance(before, dict):
        encoding = set(WriteParams.__dataclass_fields__) | {"split"}  # split: reported above
        for k in sorted((set(before) | set(settings)) - encoding):
            if before.get(k) != settings.get(k):
                diffs.append(f"{k} {before.get(k)!r} (now {settings.get(k)!r})")
    if diffs:
        raise ConversionError(f"{out} holds a different conversion, with {'; '.join(diffs)} (recorded in "
                              f"{manifest_path(out)}): pass --force to replace it, or choose another OUT")


def validate(records: Sequence[Record], max_res: int, workers: int, desc: str = "checking images",
             square: str = "crop"):
    ok: list[Record] = []
    skipped: list[dict] = []
    shapes: list[tuple[int, int]] = []
    results: list[Any] = [None] * len(records)
    jobs = [(i, r, max_res, square) for i, r in enumerate(records)]
    picklable = all(r.loader is None or getattr(r.loader, "picklable", False) for r in records)
    if workers > 1 and len(records) > 256 and picklable:
        try:
            with ProcessPoolExecutor(workers) as ex:
                for i, shape, reason in tqdm(ex.map(_check, jobs, chunksize=256), total=len(jobs), desc=desc,
                                             unit="img"):
                    results[i] = (shape, reason)
        except BrokenProcessPool:
            # A checking process killed from outside (the kernel's OOM killer on a huge image, a signal):
            # the pool gives no reason of its own, so name what was running and what to try.
            raise ConversionError("a process checking the images died (out of memory on a very large image?); "
                                  "nothing was written. Run again with --workers 1 to check them in this "
                                  "process") from None
    else:
        for job in tqdm(jobs, desc=desc, unit="img", disable=len(jobs) < 1000):
            i, shape, reason = _check(job)
            results[i] = (shape, reason)
    for rec, (shape, reason) in zip(records, results):
        if reason is None:
            ok.append(rec)
            shapes.append(shape)
        else:
            skipped.append({"path": rec.path, "reason": reason})
    return ok, skipped, shapes


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    source: str = "imagefolder",
    split: Optional[str] = None,
    params: WriteParams = WriteParams(),
    workers: int = 0,
    strict: bool = False,
    force: bool = False,
    listing: Optional[SourceListing] = None,
    classes: Optional[int | str | Sequence[str]] = None,
    fraction: Optional[float] = None,
    seed: int = 0,
    verbose: bool = True,
    **source_kwargs: Any,
) -> dict:
    """Convert ``src`` to ``out`` (.beton) and return the manifest dict.

    ``classes`` / ``fraction`` / ``seed`` select a class subset and a per-class fraction (see
    ``sources.select``). An existing ``out`` made from another source, split or subset is replaced
    only with ``force`` (``check_same_origin``); other write settings convert it again.
    """
    out = Path(out)
    if not out.name.endswith(".beton"):
        raise ConversionError(f"output {out} must end in .beton")
    params.check()
    if workers < 0:
        raise ConversionError(f"--workers must be >= 0 (0: CPU count, at most 8), got {workers}")
    check_writable(out)  # before any work
    workers = workers or min(8, os.cpu_count() or 1)
    if listing is None:
        listing = SOURCES.get(source)(src, split=split, **source_kwargs)
    listing = select(listing, classes, fraction, seed)
    fingerprint = listing.fingerprint()
    subset = {"classes": classes, "fraction": fraction, "seed": seed if fraction is not None else None}
    settings = {"source_type": listing.source_type, "split": split, **params.as_dict(),
                **_jsonable({**subset, **source_kwargs})}

    if out.is_dir():
        raise ConversionError(f"output {out} is a folder; OUT names the .beton file to write")
    old = read_manifest(out) if out.exists() else None
    if out.exists() and old is None and not force:
        # Not written by `sslray convert`, or its manifest is gone: nothing says what it holds or
        # whether its source still exists, so it is kept unless the user says otherwise.
        raise ConversionError(f"{out} exists and has no manifest ({manifest_path(out).name}): it was not "
                              f"written by sslray convert, or its manifest was removed; pass --force to "
                              f"replace it, or choose another OUT")
    if old and not force:
        check_same_origin(out, old, str(listing.root), split, settings, listing.classes)
    if old and not force and old.get("source_hash") == fingerprint and _same_settings(old.get("settings"), settings) \
            and old.get("beton_bytes") == out.stat().st_size:
        if not paths_path(out).exists():
            backfill_paths(out, old, listing)
        if verbose:
            print(f"{out}: up to date ({old['num_images']} images, source unchanged); nothing to do")
        return old

    t0 = time.time()
    ok, skipped, shapes = validate(listing.records, params.max_resolution, workers, square=params.square)
    skipped = listing.skipped + skipped
    if strict and skipped:
        named = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
        more = f"; ... and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        raise ConversionError(f"--strict: {len(skipped)} file(s) cannot be converted: {named}{more}")
    if not ok:
        raise ConversionError(f"no readable images in {listing.root} ({len(skipped)} skipped)")

    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    paths_root = paths_root_of(listing)
    lines = path_lines(ok, paths_root)
    notes = list(listing.notes)
    if lines is None:
        notes.append(f"no {paths_path(out).name}: a source path holds a line break")
    tmp_beton = partial_name(out)
    mpath, ppath = manifest_path(out), paths_path(out)
    tmp_manifest, tmp_paths = partial_name(mpath), partial_name(ppath)
    try:
        writer = _supervised(DatasetWriter)(
            str(tmp_beton),
            {
                "image": RGBImageField(
                    write_mode=params.write_mode,
                    max_resolution=params.max_resolution,
                    jpeg_quality=params.jpeg_quality,
                    compress_probability=params.compress_probability,
                ),
                "label": IntField(),
            },
            num_workers=workers,
        )
        try:
            writer.from_indexed_dataset(_ValidDataset(ok, params.max_resolution, params.square), chunksize=100)
        except WriterDied as e:
            raise ConversionError(f"writing {out} failed: {e}; nothing was written to {out}") from None
        labels = np.array([r.label for r in ok])
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "sslray_version": __version__,
            "beton": out.name,
            "source": str(listing.root),
            "source_type": listing.source_type,
            "split": split,
            "source_hash": fingerprint,
            "settings": settings,
            "write_params": params.as_dict(),
            "num_images": len(ok),
            "num_skipped": len(skipped),
            "classes": listing.classes,
            "class_names": listing.class_names,
            "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(listing.classes)},
            "unlabelled": int((labels < 0).sum()),
            "skipped": skipped,
            "skipped_reasons": reason_counts(skipped),
            "notes": notes,
            "paths_root": str(paths_root) if lines is not None else None,  # what relative lines of paths.txt are under
            "max_height": int(max(s[0] for s in shapes)),
            "max_width": int(max(s[1] for s in shapes)),
            "beton_bytes": tmp_beton.stat().st_size,
            "seconds": round(time.time() - t0, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if lines is not None:
            write_lines(tmp_paths, lines)
        tmp_manifest.write_text(json.dumps(manifest, indent=2))
        # Order matters: an old manifest or paths list must never describe the new .beton.
        mpath.unlink(missing_ok=True)
        ppath.unlink(missing_ok=True)
        os.replace(tmp_beton, out)
        if lines is not None:
            os.replace(tmp_paths, ppath)
        os.replace(tmp_manifest, mpath)
    finally:
        for tmp in (tmp_beton, tmp_paths, tmp_manifest):
            tmp.unlink(missing_ok=True)
    if verbose:
        print(summary(manifest, out))
    return manifest


def summary(manifest: dict, out: Path) -> str:
    lines = [
        f"{out}: {manifest['num_images']} images converted, {manifest['num_skipped']} skipped, "
        f"{len(manifest['classes'])} classes, {manifest['beton_bytes'] / 2**20:.1f} MiB in {manifest['seconds']} s"
    ]
    if manifest["num_skipped"]:
        counts = manifest.get("skipped_reasons") or reason_counts(manifest["skipped"])
        lines.append("  skipped by reason: " + ", ".join(f"{n} {r}" for r, n in counts.items()))
    for s in manifest["skipped"][:10]:
        lines.append(f"  skipped {s['path']}: {s['reason']}")
    if manifest["num_skipped"] > 10:
        lines.append(f"  ... and {manifest['num_skipped'] - 10} more (see {manifest_path(out)})")
    if square_mode(manifest) != "crop":
        lines.append(f"  square: {square_mode(manifest)} (non-square images stored whole, as squares)")
    for n in manifest["notes"]:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def reason_counts(skipped: Sequence[dict]) -> dict[str, int]:
    """Skip reasons grouped by kind (the text before the first colon or bracket), most common first."""
    counts: dict[str, int] = {}
    for s in skipped:
        kind = s["reason"].split(":")[0].split(" (")[0].strip()
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _same_settings(before: Any, now: dict) -> bool:
    """Manifests from before ``--square`` cropped: they are up to date for ``square=crop``."""
    return isinstance(before, dict) and {"square": "crop", **before} == now


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, (tuple, set)) else v) for k, v in d.items() if v is not None}


__all__ = ["convert", "WriteParams", "ConversionError", "SourceError", "read_manifest", "manifest_path", "paths_path",
           "source_paths", "square_mode", "SQUARE_MODES"]
