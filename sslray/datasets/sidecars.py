"""The files ``sslray convert`` writes beside a ``.beton``: ``<name>.manifest.json`` (what was converted,
how, and what was skipped) and ``<name>.paths.txt`` (the source file of each row), and how they are
read back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from .sources import Record, SourceListing


class ConversionError(RuntimeError):
    """Conversion cannot go on (strict mode hit a bad file, unwritable output, ...)."""


def beside(beton: str | os.PathLike, suffix: str) -> Path:
    p = Path(beton)
    stem = p.name[: -len(".beton")] if p.name.endswith(".beton") else p.name
    return p.with_name(stem + suffix)


def partial_name(path: Path) -> Path:
    """The temporary name ``path`` is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def manifest_path(beton: str | os.PathLike) -> Path:
    """``data/train.beton`` -> ``data/train.manifest.json``."""
    return beside(beton, ".manifest.json")


def paths_path(beton: str | os.PathLike) -> Path:
    """``data/train.beton`` -> ``data/train.paths.txt``: row i of the .beton came from line i."""
    return beside(beton, ".paths.txt")


def square_mode(manifest: dict) -> str:
    """The ``--square`` a manifest was written with; conversions from before the option cropped."""
    return (manifest.get("write_params") or {}).get("square", "crop")


def read_manifest(beton: str | os.PathLike) -> Optional[dict]:
    mp = manifest_path(beton)
    if not mp.exists():
        return None
    try:
        return json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"manifest {mp} is not valid JSON ({e}); delete it and convert again") from None


# --- source paths: OUT.paths.txt, line i names the file of row i -------------------------------------

def paths_root_of(listing: SourceListing) -> Path:
    root = Path(listing.root)
    return root.parent if root.is_file() else root  # a CSV source lists paths relative to its folder


def path_lines(records: Sequence[Record], root: Path) -> Optional[list[str]]:
    """Each record's path relative to ``root`` (as it is when outside it); None when one holds a line
    break, which a one-path-per-line file cannot say."""
    lines = []
    for r in records:
        p = Path(r.path)
        line = str(p.relative_to(root)) if p.is_relative_to(root) else r.path
        if "\n" in line or "\r" in line:
            return None
        lines.append(line)
    return lines


def write_lines(path: Path, lines: Sequence[str]) -> None:
    # surrogateescape: a file name that is not UTF-8 comes back as the same bytes
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        f.write("".join(line + "\n" for line in lines))


def backfill_paths(out: Path, old: dict, listing: SourceListing) -> None:
    """An up-to-date .beton converted before the paths list existed gets one without converting again:
    its rows are the listed records less the skipped ones, in order (the source is unchanged). The
    manifest gains the ``paths_root`` the lines are relative to, as a conversion writes it."""
    gone = {s["path"] for s in old.get("skipped", [])}
    root = paths_root_of(listing)
    lines = path_lines([r for r in listing.records if r.path not in gone], root)
    if lines is None or len(lines) != old.get("num_images"):
        return
    ppath, mpath = paths_path(out), manifest_path(out)
    tmp, tmp_manifest = partial_name(ppath), partial_name(mpath)
    try:
        write_lines(tmp, lines)
        tmp_manifest.write_text(json.dumps({**old, "paths_root": str(root)}, indent=2))
        os.replace(tmp_manifest, mpath)  # the root first: a list is never read without it
        os.replace(tmp, ppath)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)


def source_paths(beton: str | os.PathLike) -> Optional[list[str]]:
    """The source file of each row of ``beton``, in row order, as ``sslray convert`` wrote them to
    ``paths_path(beton)``: relative to the manifest's ``paths_root`` (the source folder, or the CSV's
    folder), absolute for files outside it; ``name#i`` for image ``i`` of a pickle batch. None when
    there is no such file (converted before it existed, or elsewhere)."""
    p = paths_path(beton)
    if not p.is_file():
        return None
    with open(p, encoding="utf-8", errors="surrogateescape", newline="") as f:
        lines = f.read().split("\n")
    if lines[-1] == "":
        lines.pop()
    manifest = read_manifest(beton)
    if manifest is not None and manifest.get("num_images") != len(lines):
        raise ConversionError(f"{p} lists {len(lines)} paths but {manifest_path(beton)} counts "
                              f"{manifest.get('num_images')} images: they are not from one conversion; "
                              f"convert again with --force")
    return lines
