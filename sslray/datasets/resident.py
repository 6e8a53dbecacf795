"""GPU-resident datasets: every uint8 image and label lives on the device for the whole run.

For small datasets (CIFAR-10: 50,000 x 3 x 32 x 32 = 147 MiB) the cheapest loader is none at all:
load the images once, keep them on the device, and make each batch by one ``index_select`` from
a per-epoch permutation. Views are then cut on the device as usual (``sslray.datasets.views``), so
no CPU decode or host-to-device copy sits in the training step. FFCV (``loader.make_loader``) is
for data that does not fit in device memory.

``ResidentLoader`` has ``make_loader``'s interface: iterating yields ``(uint8 NCHW images, int64
labels)`` on the device; ``next_epoch`` picks the epoch whose order the next pass uses (the order
is a ``torch.Generator`` permutation seeded with ``seed + epoch``, so a resumed run gets the same
order back); ``len`` counts batches. Sharding follows ``DistributedSampler``: with world size W the
epoch's permutation is padded with its first few entries to a multiple of W and rank r takes
entries r, r+W, r+2W, ...; the shards are disjoint (up to the padding) and cover the data.

Sources: an ImageFolder tree (decoded once by PIL, cached as ``<tree>.resident<res>.npz`` next to
it), a .beton (read once through ffcv, when ffcv is importable), an ImageFolder-in-tar archive such
as the shared CIFAR-10 (``load_archive``), or tensors already in memory.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import loader as _loader
from .sources import Record, SourceListing

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# --- decoding -------------------------------------------------------------------------------------

def _decode(data: bytes, res: int) -> np.ndarray:
    """JPEG/PNG bytes -> HxWx3 uint8; the centre square resized to ``res`` unless it already is."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    if res and img.size != (res, res):
        return _loader._CenterSquare(res)(img).permute(1, 2, 0).numpy()
    return np.asarray(img, dtype=np.uint8)


def _decode_all(blobs: Sequence[bytes], res: int, workers: Optional[int] = None) -> np.ndarray:
    """Decode in threads (PIL releases the GIL while decoding) into one (N, 3, res, res) array."""
    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as ex:
        imgs = list(ex.map(lambda b: _decode(b, res), blobs, chunksize=256))
    if not imgs:
        raise _loader.DataError("no images found")
    shapes = {im.shape for im in imgs}
    if len(shapes) != 1:
        raise _loader.DataError(f"images differ in size {sorted(shapes)[:3]}...; pass a decode res")
    return np.ascontiguousarray(np.stack(imgs).transpose(0, 3, 1, 2))


def load_archive(archive: str | os.PathLike, split: str, res: int = 0, per_class: int = 0,
                 cache_dir: Optional[str | os.PathLike] = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(images (N,3,H,W) uint8, labels (N,) int64, classes)`` of ``<split>/<class>/<image>`` members
    of a tar(.gz) ImageFolder archive, read straight from the archive (no extraction to disk).

    ``per_class`` > 0 keeps only the first ``per_class`` images of each class (sorted by name).
    With ``cache_dir`` the arrays are cached there as an .npz and later calls load that instead."""
    cache = stamp = None
    if cache_dir:
        # Named by the archive's absolute path (two archives of one name do not share a cache) and
        # reused only while the archive's size and mtime are those it was made from.
        path = Path(archive).resolve()
        st = path.stat()
        where = hashlib.blake2b(str(path).encode(), digest_size=6).hexdigest()
        tag = f"{path.name.split('.')[0]}-{where}-{split}-r{res}-pc{per_class}.npz"
        cache = Path(cache_dir) / tag
        stamp = hashlib.blake2b(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode(), digest_size=16).hexdigest()
        found = _load_npz(cache, stamp)
        if found is not None:
            return found
    members: dict[tuple[str, str], bytes] = {}
    prefix = split.strip("/") + "/"
    with tarfile.open(archive) as tf:
        for m in tf:
            name = m.name[2:] if m.name.startswith("./") else m.name
            if not (m.isfile() and name.startswith(prefix) and name.lower().endswith(IMAGE_EXTS)):
                continue
            parts = name[len(prefix):].split("/")
            if len(parts) != 2:
                continue
            members[(parts[0], parts[1])] = tf.extractfile(m).read()
    if not members:
        raise _loader.DataError(f"{archive} has no images under {prefix}<class>/")
    classes = sorted({c for c, _ in members})
    keys = sorted(members)
    if per_class:
        taken: dict[str, int] = {}
        kept = []
        for k in keys:
            if taken.get(k[0], 0) < per_class:
                taken[k[0]] = taken.get(k[0], 0) + 1
                kept.append(k)
        keys = kept
    images = _decode_all([members[k] for k in keys], res)
    labels = np.array([classes.index(c) for c, _ in keys], dtype=np.int64)
    if cache is not None:
        _save_npz(cache, images, labels, classes, stamp)
    return images, labels, classes


def load_image_folder(root: str | os.PathLike, res: int = 0, cache: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An ImageFolder tree -> ``(images, labels, classes)``; cached as ``<root>.resident<res>.npz``
    beside the tree when that directory is writable (a second load costs one ``np.load``). The cache
    holds the fingerprint of the file list (every image's path, label, size and mtime) and is used only
    while the tree still has that fingerprint: an image added, removed or replaced inside a class
    folder leaves the folder's own mtime alone, so the tree's mtime cannot tell."""
    root = Path(root)
    npz = root.parent / f"{root.name}.resident{res}.npz"
    if not root.is_dir():
        raise _loader.DataError(f"{root} is not an ImageFolder tree (<class>/<image>): no such folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = [(ci, f) for ci, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_EXTS]
    if not files:
        raise _loader.DataError(f"{root} is not an ImageFolder tree (<class>/<image>) with images")
    stamp = SourceListing([Record(str(f.resolve()), ci) for ci, f in files], classes, "resident",
                          str(root.resolve())).fingerprint()
    found = _load_npz(npz, stamp) if cache else None
    if found is not None:
        return found
    images = _decode_all([f.read_bytes() for _, f in files], res)
    labels = np.array([ci for ci, _ in files], dtype=np.int64)
    if cache and os.access(root.parent, os.W_OK):
        _save_npz(npz, images, labels, classes, stamp)
    return images, labels, classes


def load_beton(path: str, res: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A .beton read once, in order, through ffcv (``make_loader``'s centre-square decode)."""
    info = _loader.dataset_info(path)
    xs, ys = [], []
    for x, y in _loader.make_loader(path, 512, res=res, device=torch.device("cpu"), train=False,
                                    num_workers=min(8, os.cpu_count() or 1)):
        xs.append(x.numpy().copy())
        ys.append(y.numpy().astype(np.int64).copy())
    return np.concatenate(xs), np.concatenate(ys), list(info.classes)


def _save_npz(path: Path, images, labels, classes, stamp: str) -> None:
    """Write the cache under a name of this writer's own, then rename it into place: never a
    half-written cache, and the workers of a node that build it at once (each its own process) do
    not take each other's file (the last rename wins; every writer wrote the same arrays). A cache
    that cannot be written is a warning: the arrays are in memory and the run goes on."""
    import tempfile
    import warnings

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, labels=labels, classes=np.array(classes), stamp=np.array(stamp))
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        warnings.warn(f"sslray: could not write the resident-data cache {path} ({e}); the next run decodes "
                      "the images again", stacklevel=2)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _load_npz(path: Path, stamp: str) -> Optional[tuple[np.ndarray, np.ndarray, list[str]]]:
    """The cached arrays when ``path`` was made from the source ``stamp`` describes; None otherwise
    (no cache, a cache of other data, one written before caches carried a stamp, or an unreadable one:
    each is rebuilt from the source)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if "stamp" not in z.files or str(z["stamp"]) != stamp:
                return None
            return z["images"], z["labels"], [str(c) for c in z["classes"]]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


# --- the resident dataset and its loader -----------------------------------------------------------

class ResidentDataset:
    """All images (N,3,H,W uint8) and labels (N, int64) on one device."""

    def __init__(self, images, labels, classes: Sequence[str], device: torch.device | str = "cpu"):
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels).long()
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N,3,H,W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels {tuple(labels.shape)} do not match {images.shape[0]} images")
        self.images = images.to(device).contiguous()
        self.labels = labels.to(device)
        self.classes = list(classes)
        self.device = self.images.device

    def __len__(self) -> int:
        return self.images.shape[0]

    @classmethod
    def from_path(cls, path: str, res: int, device: torch.device | str) -> "ResidentDataset":
        x, y, classes = load_image_folder(path, res) if os.path.isdir(path) else load_beton(path, res)
        return cls(x, y, classes, device)


def shard_order(n: int, epoch: int, *, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Positions ``0..n-1`` in this epoch's order for ``rank`` (CPU int64): DistributedSampler's rule
    (permutation seeded ``seed + epoch``, padded to a multiple of ``world_size``, every
    ``world_size``-th entry from ``rank``), reduced to the plain permutation when world_size is 1."""
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    if world_size > 1:
        total = -(-n // world_size) * world_size
        if total > n:
            order = torch.cat([order, order[: total - n].repeat(-(-(total - n) // n))[: total - n]])
        order = order[rank:total:world_size]
    return order


class ResidentLoader:
    """``make_loader``'s interface over a ``ResidentDataset``; ``indices`` picks a subset."""

    def __init__(self, data: ResidentDataset, batch_size: int, *, train: bool, seed: int = 0,
                 indices: Optional[Sequence[int]] = None, drop_last: Optional[bool] = None,
                 distributed: Optional[bool] = None, rank: Optional[int] = None, world_size: Optional[int] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data, self.batch_size, self.train, self.seed = data, batch_size, train, seed
        self.drop_last = train if drop_last is None else drop_last
        idx = torch.arange(len(data)) if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.long)
        self.indices = idx.to(data.device)
        from ..raytrain import distributed as D

        dist_on = D.is_dist() if distributed is None else distributed
        self.rank = rank if rank is not None else (D.rank() if dist_on else 0)
        self.world_size = world_size if world_size is not None else (D.world_size() if dist_on else 1)
        self.next_epoch = 0

    def _order(self, epoch: int) -> torch.Tensor:
        pos = shard_order(len(self.indices), epoch, seed=self.seed, shuffle=self.train, rank=self.rank,
                          world_size=self.world_size)
        return self.indices[pos.to(self.indices.device)]

    def __len__(self) -> int:
        n = -(-len(self.indices) // self.world_size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = self._order(self.next_epoch)
        self.next_epoch += 1
        b = self.batch_size
        stop = len(order) // b * b if self.drop_last else len(order)
        x, y = self.data.images, self.data.labels
        for i in range(0, stop, b):
            sel = order[i : i + b]
            yield x.index_select(0, sel), y.index_select(0, sel)


_CACHE: dict[tuple[str, int, str], ResidentDataset] = {}


def make_resident_loader(path: str, batch_size: int, *, res: int, device: torch.device, train: bool, seed: int = 0,
                         indices: Optional[Sequence[int]] = None, distributed: bool = False,
                         drop_last: Optional[bool] = None, **_ignored) -> ResidentLoader:
    """Drop-in for ``make_loader`` (same keywords; ``num_workers``/``os_cache``/``batches_ahead`` have
    nothing to do here). The dataset is loaded once per (path, res, device) and shared by every
    loader of the process, so the train, kNN-bank and val loaders hold one copy."""
    key = (os.path.abspath(path), int(res), str(device))
    if key not in _CACHE:
        _CACHE[key] = ResidentDataset.from_path(path, res, device)
    return ResidentLoader(_CACHE[key], batch_size, train=train, seed=seed, indices=indices, drop_last=drop_last,
                          distributed=distributed)


__all__ = ["ResidentDataset", "ResidentLoader", "make_resident_loader", "shard_order", "load_archive",
           "load_image_folder", "load_beton"]
