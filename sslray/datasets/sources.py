"""Sources: turn whatever the user has on disk into a list of (path, label) records.

Each source is registered with ``@register_source`` and returns a ``SourceListing``; the converter
never needs to know where the records came from. Nothing here decodes images: validation
happens in one place, ``sslray.datasets.convert``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

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
        for r in self.records:
            h.update(f"{r.path}\0{r.label}\0".encode())
            try:
                st = os.stat(r.path)
                h.update(f"{st.st_size}\0{st.st_mtime_ns}\0".encode())
            except OSError:
                h.update(b"missing\0")
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


@register_source("imagefolder")
def imagefolder(src: str | os.PathLike, split: str | None = None, **_: object) -> SourceListing:
    """``SRC/<class>/<image>``, or ``SRC/<split>/<class>/<image>`` with ``split`` given."""
    root = Path(src)
    _require_dir(root)
    if split:
        root = root / split
        if not root.is_dir():
            have = sorted(p.name for p in Path(src).iterdir() if p.is_dir())
            raise SourceError(f"split folder {root} does not exist; {src} holds: {', '.join(have) or 'nothing'}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise SourceError(f"{root} holds no class folders (expected {root}/<class>/<image>)")
    classes = [d.name for d in class_dirs]
    records, notes, skipped = list_class_folder(root, class_dirs, classes)
    return SourceListing(records, classes, "imagefolder", str(root.resolve()), notes=notes, skipped=skipped)
