"""Sources: turn whatever the user has on disk into a list of (path, label) records.

Each source is registered with ``@register_source`` and returns a ``SourceListing``; the converter
never needs to know where the records came from. Nothing here decodes images: validation
happens in one place, ``sslray.datasets.convert``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import pickle
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..registry import Registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class SourceError(ValueError):
    """The source cannot be read at all (missing path, bad layout); the message names the path."""


@dataclass
class Record:
    path: str  # absolute path of an image file (or "<file>#<index>" for in-memory sources)
    label: int  # class index, or -1 for unlabelled data
    loader: Optional[Callable[[], object]] = None  # returns a PIL image for non-file sources


@dataclass
class SourceListing:
    records: list[Record]
    classes: list[str]  # index -> class name
    source_type: str
    root: str
    class_names: dict[str, str] = field(default_factory=dict)  # folder name -> human name, if known
    notes: list[str] = field(default_factory=list)  # e.g. empty class folders
    skipped: list[dict] = field(default_factory=list)  # entries rejected before decoding

    def fingerprint(self) -> str:
        """Hash of every record's path, size and mtime: a rerun on unchanged data is detected
        without reading the bytes (the same trade-off `make` makes)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.source_type.encode())
        stats: dict[str, bytes] = {}  # in-memory sources: many records share one file ("<file>#<i>")
        for r in self.records:
            h.update(f"{r.path}\0{r.label}\0".encode())
            f = r.path.split("#", 1)[0] if r.loader is not None else r.path
            if f not in stats:
                try:
                    st = os.stat(f)
                    stats[f] = f"{st.st_size}\0{st.st_mtime_ns}\0".encode()
                except OSError:
                    stats[f] = b"missing\0"
            h.update(stats[f])
        return h.hexdigest()


SOURCES: Registry[Callable[..., SourceListing]] = Registry("source")
register_source = SOURCES.register


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _require_dir(path: Path) -> None:
    if not path.exists():
        raise SourceError(f"source {path} does not exist")
    if not path.is_dir():
        raise SourceError(f"source {path} is not a folder")


def list_class_folder(root: Path, class_dirs: list[Path], classes: list[str]) -> tuple[list[Record], list[str], list[dict]]:
    """Records for ``<class>/<image>`` folders. Non-image files are reported, not silently dropped."""
    index = {c: i for i, c in enumerate(classes)}
    records: list[Record] = []
    notes: list[str] = []
    skipped: list[dict] = []
    for d in class_dirs:
        names = sorted(os.listdir(d))
        n_before = len(records)
        for name in names:
            p = d / name
            if p.is_dir():
                continue
            if is_image_name(name):
                records.append(Record(str(p.resolve()), index[d.name]))
            else:
                skipped.append({"path": str(p), "reason": "not an image file extension"})
        if len(records) == n_before:
            notes.append(f"class folder {d} holds no images")
    return records, notes, skipped


def split_root(src: str | os.PathLike, split: str | None) -> Path:
    """``SRC`` or ``SRC/<split>``; a missing split names the folders that do exist."""
    root = Path(src)
    _require_dir(root)
    if split:
        root = root / split
        if not root.is_dir():
            have = sorted(p.name for p in Path(src).iterdir() if p.is_dir())
            raise SourceError(f"split folder {root} does not exist; {src} holds: {', '.join(have) or 'nothing'}")
    return root


def _holds_class_images(folder: Path) -> bool:
    """Whether some ``folder/<class>/`` holds an image file (stops at the first one found); a folder
    this user cannot read (``lost+found``, another user's run) is no split."""
    try:
        with os.scandir(folder) as subs:
            for sub in subs:
                if sub.is_dir():
                    with os.scandir(sub.path) as entries:
                        if any(e.is_file() and is_image_name(e.name) for e in entries):
                            return True
    except PermissionError:
        pass
    return False


@register_source("imagefolder")
def imagefolder(src: str | os.PathLike, split: str | None = None, **_: object) -> SourceListing:
    """``SRC/<class>/<image>``, or ``SRC/<split>/<class>/<image>`` with ``split`` given. With a split,
    the classes are the sorted class folders of *every* split folder of ``SRC`` (as for
    ``imagenet100``), so a split that lacks a class still numbers the others as its siblings do."""
    root = split_root(src, split)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise SourceError(f"{root} holds no class folders (expected {root}/<class>/<image>)")
    classes = [d.name for d in class_dirs]
    notes: list[str] = []
    if split:
        # Only a folder whose class folders hold images is a split: outputs kept beside the data
        # (runs/, mlartifacts/, a compare/ folder) would otherwise add their sub-folders as classes.
        siblings = [p for p in sorted(Path(src).iterdir()) if p.is_dir() and (p == root or _holds_class_images(p))]
        classes = sorted({c.name for s in siblings for c in s.iterdir() if c.is_dir()})
        absent = [c for c in classes if not (root / c).is_dir()]
        if absent:
            notes.append(f"{root} has no folder for {len(absent)} class(es) found in its sibling splits: "
                         f"{', '.join(absent[:10])}" + (" ..." if len(absent) > 10 else ""))
    records, folder_notes, skipped = list_class_folder(root, class_dirs, classes)
    if not records and not split:
        nested = [d for d in class_dirs if all(p.is_dir() for p in d.iterdir()) and any(d.iterdir())]
        if nested:
            shown = [str(Path(src) / d.name) for d in nested]
            if len(shown) > 3:
                shown = shown[:3] + [f"{len(nested) - 3} more"]
            where = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
            guess = next((d.name for d in nested if d.name == "train"), nested[0].name)
            raise SourceError(f"no images at {src}/<class>/<image>: {where} "
                              f"{'holds' if len(nested) == 1 else 'hold'} only sub-folders: "
                              f"did you mean --split {guess}?")
    return SourceListing(records, classes, "imagefolder", str(root.resolve()), notes=notes + folder_notes,
                         skipped=skipped)


def select(listing: SourceListing, classes: Optional[int | str | Sequence[str]] = None,
           fraction: Optional[float] = None, seed: int = 0) -> SourceListing:
    """Class subset and per-class fraction, applied the same way to every source.

    ``classes``: an int N keeps the source's first N classes (how ImageNet-100 seeds trained on "the
    first 40 classes"); a list or comma string keeps those names. The source's own class order is
    kept (sorted folder names; ``0, 1, 2, ..., 10`` for integer CSV labels, not ``0, 1, 10``) and
    labels are renumbered 0..K-1 in it, so train and val converted with the same option agree.
    ``fraction``: keep round(fraction * n) images of each class (at least 1), chosen with ``seed``;
    unlabelled images (-1) count as one group. Record order is preserved.
    """
    if classes is None and fraction is None:
        return listing
    records, names, notes = listing.records, listing.classes, list(listing.notes)
    if classes is not None:
        if isinstance(classes, str) and classes.strip().isdigit():
            classes = int(classes)
        if isinstance(classes, int):
            if not 0 < classes <= len(names):
                raise SourceError(f"--classes {classes}: the source has {len(names)} classes")
            keep = names[:classes]
        else:
            keep = [c.strip() for c in (classes.split(",") if isinstance(classes, str) else classes) if c.strip()]
            unknown = [c for c in keep if c not in names]
            if unknown:
                raise SourceError(f"--classes: {', '.join(unknown)} not in the source; it has {', '.join(names[:10])}"
                                  + (" ..." if len(names) > 10 else ""))
            wanted = set(keep)
            keep = [c for c in names if c in wanted]
        new_index = {names.index(c): i for i, c in enumerate(keep)}
        records = [replace(r, label=new_index[r.label]) for r in records if r.label in new_index]
        names = keep
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise SourceError(f"--fraction must be in (0, 1], not {fraction}")
        rng = np.random.default_rng(seed)
        by_label: dict[int, list[int]] = {}
        for i, r in enumerate(records):
            by_label.setdefault(r.label, []).append(i)
        chosen: list[int] = []
        for label in sorted(by_label):
            idx = by_label[label]
            k = max(1, round(fraction * len(idx)))
            chosen += rng.choice(idx, size=k, replace=False).tolist()
        records = [records[i] for i in sorted(chosen)]
    class_names = {c: n for c, n in listing.class_names.items() if c in names}
    return replace(listing, records=records, classes=names, class_names=class_names, notes=notes)


# --- ImageNet-100 split layout ------------------------------------------------------------------

IMAGENET100_SPLITS = {"train": ("train.X1", "train.X2", "train.X3", "train.X4"), "val": ("val.X",)}


def read_labels_json(path: Path, wnids: list[str]) -> tuple[dict[str, str], list[str]]:
    """``Labels.json`` (wnid -> human name). Missing: a warning and the wnids are used as names
    (the images are still perfectly usable). Malformed: a SourceError naming the file, because a
    file that exists but cannot be read means the tree is not what the user thinks it is."""
    if not path.exists():
        msg = f"{path} not found: class names are the wnids"
        warnings.warn(msg, stacklevel=3)
        return {}, [msg]
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path} is not valid JSON ({e}); expected {{\"<wnid>\": \"<class name>\", ...}}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise SourceError(f"{path} must map wnid strings to class-name strings, e.g. {{\"n01440764\": \"tench\"}}")
    notes = []
    missing = [w for w in wnids if w not in data]
    if missing:
        notes.append(f"{path} has no name for {len(missing)} class folder(s): {', '.join(missing[:5])}")
    return {w: data[w] for w in wnids if w in data}, notes


@register_source("imagenet100")
def imagenet100(src: str | os.PathLike, split: str | None = None, **_: object) -> SourceListing:
    """``SRC/train.X1..train.X4/<wnid>/*.JPEG`` merged as ``train``, ``SRC/val.X/<wnid>/*.JPEG`` as
    ``val``; ``SRC/Labels.json`` names the classes. Classes are the sorted wnids of *all* split
    folders, so train and val agree on label indices."""
    root = Path(src)
    _require_dir(root)
    split = split or "train"
    if split not in IMAGENET100_SPLITS:
        raise SourceError(f"imagenet100 split must be one of {', '.join(IMAGENET100_SPLITS)}, not {split!r}")
    all_dirs = [root / d for ds in IMAGENET100_SPLITS.values() for d in ds if (root / d).is_dir()]
    split_dirs = [root / d for d in IMAGENET100_SPLITS[split] if (root / d).is_dir()]
    if not split_dirs:
        want = ", ".join(IMAGENET100_SPLITS[split])
        raise SourceError(f"{root} has none of the {split} folders ({want}); is this the ImageNet-100 layout?")
    classes = sorted({p.name for d in all_dirs for p in d.iterdir() if p.is_dir()})
    if not classes:
        raise SourceError(f"{root}: the split folders hold no <wnid> class folders")
    records, notes, skipped = [], [], []
    for d in split_dirs:
        class_dirs = sorted(p for p in d.iterdir() if p.is_dir())
        r, n, s = list_class_folder(d, class_dirs, classes)
        records += r
        notes += n
        skipped += s
    names, label_notes = read_labels_json(root / "Labels.json", classes)
    return SourceListing(records, classes, "imagenet100", str(root.resolve()), class_names=names,
                         notes=label_notes + notes, skipped=skipped)


# --- CIFAR python pickles -----------------------------------------------------------------------

CIFAR_LAYOUT = {
    # name: (sub-folder of the official archive, train files, test files, meta file, names key, labels key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels"),
}


@functools.lru_cache(maxsize=8)
def _cifar_batch(path: str) -> dict:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_pixels(path: str) -> np.ndarray:
    data = _cifar_batch(path)["data"]
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)


@dataclass(frozen=True)
class CifarImage:
    """Picklable loader for one image of a pickle batch (the batch is read once per process)."""

    path: str
    index: int
    picklable = True  # lets the converter validate these records in worker processes

    def __call__(self):
        from PIL import Image

        return Image.fromarray(_cifar_pixels(self.path)[self.index].transpose(1, 2, 0), "RGB")


def _cifar(kind: str, src: str | os.PathLike, split: str | None) -> SourceListing:
    sub, train_files, test_files, meta_name, names_key, labels_key = CIFAR_LAYOUT[kind]
    root = Path(src)
    _require_dir(root)
    if (root / sub).is_dir():
        root = root / sub
    split = split or "train"
    if split not in ("train", "test"):
        raise SourceError(f"{kind} split must be train or test, not {split!r}")
    files = [root / f for f in (train_files if split == "train" else test_files)]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise SourceError(f"{kind}: {', '.join(missing)} not found (expected the python pickle batches)")
    meta = root / meta_name
    try:
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in _cifar_batch(str(meta))[names_key]]
    except FileNotFoundError:
        raise SourceError(f"{kind}: {meta} not found (it holds the class names)") from None
    except Exception as e:
        raise SourceError(f"{kind}: {meta} is not a CIFAR meta pickle ({type(e).__name__}: {e})") from None
    records: list[Record] = []
    for f in files:
        try:
            batch = _cifar_batch(str(f))
            labels = [int(x) for x in batch[labels_key]]
            n = len(_cifar_pixels(str(f)))
        except Exception as e:
            raise SourceError(f"{kind}: {f} is not a CIFAR pickle batch ({type(e).__name__}: {e})") from None
        if n != len(labels):
            raise SourceError(f"{kind}: {f} holds {n} images but {len(labels)} labels")
        records += [Record(f"{f.resolve()}#{i}", lab, CifarImage(str(f.resolve()), i)) for i, lab in enumerate(labels)]
    return SourceListing(records, classes, kind, str(root.resolve()))


@register_source("cifar10")
def cifar10(src: str | os.PathLike, split: str | None = None, **_: object) -> SourceListing:
    """CIFAR-10 python pickles: ``data_batch_1..5`` (train) / ``test_batch`` (test), ``batches.meta``."""
    return _cifar("cifar10", src, split)


@register_source("cifar100")
def cifar100(src: str | os.PathLike, split: str | None = None, **_: object) -> SourceListing:
    """CIFAR-100 python pickles: ``train`` / ``test`` with the 100 fine labels, names from ``meta``."""
    return _cifar("cifar100", src, split)


# --- unlabelled folder --------------------------------------------------------------------------

@register_source("unlabelled")
def unlabelled(src: str | os.PathLike, split: str | None = None, **_: object) -> SourceListing:
    """Every image under ``SRC`` (recursively), label -1: pretraining only; probes need a labelled split."""
    root = split_root(src, split)
    records, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if is_image_name(name):
                records.append(Record(str(p.resolve()), -1))
            else:
                skipped.append({"path": str(p), "reason": "not an image file extension"})
    if not records:
        raise SourceError(f"{root} holds no image files")
    return SourceListing(records, [], "unlabelled", str(root.resolve()), skipped=skipped)


# --- CSV file list ------------------------------------------------------------------------------

@register_source("csv")
def csv_list(src: str | os.PathLike, split: str | None = None, **_: object) -> SourceListing:
    """A CSV of ``path,label`` rows (a ``path,label`` header is optional). Relative paths are
    resolved against the CSV's folder. Labels are integers (classes ``0..max``) or names (sorted);
    an empty label means unlabelled (-1). Bad rows are reported in ``skipped`` with their line."""
    f = Path(src)
    if not f.exists():
        raise SourceError(f"source {f} does not exist")
    if not f.is_file():
        raise SourceError(f"csv source {f} must be a file of path,label rows")
    base = f.resolve().parent
    rows: list[tuple[str, str]] = []
    skipped: list[dict] = []
    try:
        with open(f, newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        hint = " (this is an image: give the CSV that lists the images)" if is_image_name(f.name) else ""
        raise SourceError(f"csv source {f} is not a UTF-8 text file (byte {e.start} cannot be decoded){hint}; "
                          "expected a text CSV of path,label rows") from None
    if "\0" in text:
        raise SourceError(f"csv source {f} holds NUL bytes, so it is not a text file; "
                          "expected a text CSV of path,label rows")
    try:
        rows_read = list(enumerate(csv.reader(io.StringIO(text, newline="")), 1))
    except csv.Error as e:
        raise SourceError(f"csv source {f} cannot be parsed as CSV ({e}); expected path,label rows") from None
    for lineno, row in rows_read:
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if lineno == 1 and [c.lower() for c in cells[:2]] == ["path", "label"]:
            continue
        if len(cells) > 2 or not cells[0]:
            skipped.append({"path": f"{f}:{lineno}", "reason": f"bad row {row!r} (expected path,label)"})
            continue
        p = Path(cells[0]).expanduser()
        p = p if p.is_absolute() else base / p
        label = cells[1] if len(cells) > 1 else ""
        if not p.is_file():
            skipped.append({"path": str(p), "reason": f"file does not exist ({f}:{lineno})"})
        elif not is_image_name(p.name):
            skipped.append({"path": str(p), "reason": f"not an image file extension ({f}:{lineno})"})
        else:
            rows.append((str(p.resolve()), label))
    labelled = [lab for _, lab in rows if lab]
    if labelled and all(_is_int(x) for x in labelled):
        ints = [int(x) for x in labelled]
        if min(ints) < 0:
            raise SourceError(f"{f}: integer labels must be >= 0 (leave the label empty for unlabelled images)")
        classes = [str(i) for i in range(max(ints) + 1)]
        index = {c: i for i, c in enumerate(classes)}
    else:
        classes = sorted(set(labelled))
        index = {c: i for i, c in enumerate(classes)}
    int_mode = bool(labelled) and classes == [str(i) for i in range(len(classes))] and all(_is_int(x) for x in labelled)
    records = [Record(p, (int(lab) if int_mode else index[lab]) if lab else -1) for p, lab in rows]
    if not records and not skipped:
        raise SourceError(f"{f} lists no images")
    return SourceListing(records, classes, "csv", str(f.resolve()), skipped=skipped)


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False
