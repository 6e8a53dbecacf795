"""Per-worker loaders: each JPEG is decoded once on the CPU, uint8 batches go to the device.

Views are made on the device afterwards (``sslray.datasets.views``), so the loader's only job is
decode + copy. ffcv 1.0.2 has no per-field multi-view mapper, which is why one decode feeds all
views.

Sharding: every Ray Train worker builds its own loader. With ``distributed=True`` (world size > 1)
FFCV's RANDOM order is a torch ``DistributedSampler`` over ``indices`` reading rank and world size
from ``torch.distributed`` (which Ray Train has initialised), re-seeded every epoch by
``set_epoch(loader.next_epoch)``: the ranks see disjoint shards that together cover the data (the
sampler pads with a few repeats when the count does not divide). Single process: a permutation
seeded with ``seed + epoch``. Resuming sets ``loader.next_epoch`` to get the same order back.

Memory: with ``os_cache=True`` (default) the .beton is memory-mapped and shared by every worker on
a node through the page cache, so RAM use is about the file size once, not once per worker: right
when the file fits in RAM. ``os_cache=False`` makes FFCV read pages itself into a per-process cache
(use it when the file is much larger than RAM, e.g. ImageNet at max-res 512 on a small node).
``batches_ahead`` (default 2) is how many batches are decoded ahead of the training step; each
costs ``batch x res x res x 3`` bytes per worker plus the per-thread decode buffers of
``max_res x max_res x 3`` bytes, so ``--max-res`` at conversion bounds the file, the page cache
and the decode buffers alike.

No ffcv? ``make_loader`` on an ImageFolder directory, or ``make_torchvision_loader``, gives the same
interface from torchvision's ``ImageFolder`` + ``DataLoader`` (slower: PIL decode in processes).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .convert import read_manifest, square_mode


def _quiet_numba_finalizer(hook=sys.unraisablehook):
    """ffcv's compiled pipelines leave numba dispatchers whose finalizers raise a harmless KeyError
    when a Loader is garbage-collected; hide exactly that, pass everything else on."""

    def filtered(unraisable):
        tb = unraisable.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = tb.tb_frame.f_code.co_filename if tb is not None else ""
        if isinstance(unraisable.exc_value, KeyError) and where.endswith(os.path.join("numba", "core", "dispatcher.py")):
            return
        hook(unraisable)

    sys.unraisablehook = filtered


_quiet_numba_finalizer()


class DataError(ValueError):
    """A dataset file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class DatasetInfo:
    path: str
    num_images: int
    classes: list[str]
    square: str = "crop"  # how `sslray convert --square` stored non-square images (crop: as they were)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def dataset_info(path: str) -> DatasetInfo:
    """Read the .beton's manifest (or its header when converted elsewhere); an ImageFolder
    directory (for the torchvision loader) is described by its class folders."""
    if not path:
        raise DataError("no dataset given (expected a .beton written by `sslray convert`)")
    if not os.path.exists(path):
        raise DataError(f"dataset {path} does not exist; convert it first with `sslray convert SRC {path}`")
    if os.path.isdir(path):
        ds = _image_folder(path, res=0)
        return DatasetInfo(path, len(ds), list(ds.classes))
    manifest = read_manifest(path)
    if manifest is not None:
        if manifest.get("beton_bytes") not in (None, os.path.getsize(path)):
            raise DataError(f"{path} does not match its manifest (size differs): the conversion did not finish")
        return DatasetInfo(path, int(manifest["num_images"]), list(manifest["classes"]), square_mode(manifest))
    from ffcv.reader import Reader

    try:
        reader = Reader(path)
    except Exception as e:
        raise DataError(f"{path} is not a readable .beton: {e}") from None
    # The alloc table holds only (sample_id, ptr, size); each field's values sit in metadata["f<index>"].
    names = list(reader.field_names)
    labels = reader.metadata[f"f{names.index('label')}"] if "label" in names else None
    n = int(reader.num_samples)
    k = int(np.max(labels)) + 1 if labels is not None and len(labels) else 0
    return DatasetInfo(path, n, [str(i) for i in range(k)])


def square_note(train: DatasetInfo, val: Optional[DatasetInfo]) -> Optional[str]:
    """A note when the two splits were converted with different ``--square`` modes: a probe fitted on
    whole padded or squashed images and scored on centre crops (or the reverse) sees two kinds of image."""
    if val is None or train.square == val.square:
        return None
    return (f"{train.path} was converted with --square {train.square} and {val.path} with --square {val.square}: "
            "the probes and the kNN monitor compare images made two ways; convert both splits the same way")


def check_same_classes(train: DatasetInfo, val: DatasetInfo) -> list[str]:
    """The class list that ``train`` and ``val`` share; a DataError naming both files when they differ.

    Labels are indices into each file's own list, so a val split converted without one of train's
    classes (or with them in another order) would be scored against shifted labels. Integer classes
    (``0..K-1``: integer CSV labels, or a .beton read without its manifest) agree index for index even
    when one split lacks the top classes; the longer list is returned then. Unlabelled data (no
    classes) is left to the caller: the other file's list is returned as it is."""
    a, b = list(train.classes), list(val.classes)
    if not a or not b or a == b:
        return a or b
    if _is_index_list(a) and _is_index_list(b):
        return a if len(a) >= len(b) else b

    def names(cs: list[str]) -> str:
        return (", ".join(cs[:10]) + (f" ... ({len(cs)} in all)" if len(cs) > 10 else "")) if cs else "none"

    in_a, in_b = set(a), set(b)
    only_train, only_val = [c for c in a if c not in in_b], [c for c in b if c not in in_a]
    if only_train or only_val:
        diff = f"only in train: {names(only_train)}; only in val: {names(only_val)}"
    else:
        diff = f"same classes in another order: train {names(a)}; val {names(b)}"
    raise DataError(
        f"train {train.path} ({len(a)} classes) and val {val.path} ({len(b)} classes) number their classes "
        f"differently ({diff}): labels are class indices, so both files must list the same classes in the "
        "same order. Convert the splits from one tree with `sslray convert SRC OUT --split NAME` (the classes "
        "of every split folder are used), or give each CSV every class"
    )


def _is_index_list(classes: list[str]) -> bool:
    return classes == [str(i) for i in range(len(classes))]


def subset_indices(n: int, limit: int, seed: int = 0) -> Optional[np.ndarray]:
    """First-``limit`` indices would be class-sorted for ImageFolder data, so take a seeded random
    subset instead: every class is represented in proportion."""
    if not limit or limit >= n:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=limit, replace=False))


def spread_indices(total: int, n: int, seed: int = 0) -> list[int]:
    """``min(n, total)`` sorted indices into ``range(total)``, one drawn (seeded) from each of as many equal
    stretches. Converted datasets are sorted by class, so the first ``n`` images would all share one; a
    stretch per image keeps the sample spread over the classes, and the seed shows other images."""
    n = min(n, total)
    if n < 1:
        return []
    edges = np.arange(n + 1, dtype=np.int64) * total // n
    return np.random.default_rng(seed).integers(edges[:-1], edges[1:]).tolist()


def spread_subset(indices: Optional[Sequence[int]], total: int, n: int, seed: int = 0) -> np.ndarray:
    """``spread_indices`` over a split: dataset indices of ``n`` images spread over ``indices`` (a sorted
    subset, as ``subset_indices`` gives) or, for ``None``, over all ``total`` images of the file. The
    pictures draw their images with it, so a class-sorted file shows several classes."""
    pos = np.asarray(spread_indices(total if indices is None else len(indices), n, seed), dtype=np.int64)
    return pos if indices is None else np.asarray(indices)[pos]


def eval_slice(indices: Optional[np.ndarray], n: int, rank: int, world_size: int) -> Optional[np.ndarray]:
    """Rank ``rank``'s contiguous slice of an evaluation split (``indices``, or all ``n`` images), every
    image in exactly one slice. A distributed loader pads the last shard with repeats instead, which
    scores those images twice."""
    if world_size == 1:
        return indices
    return np.array_split(np.arange(n) if indices is None else np.asarray(indices), world_size)[rank]


def make_loader(
    path: str,
    batch_size: int,
    *,
    res: int,
    device: torch.device,
    train: bool,
    seed: int = 0,
    indices: Optional[Sequence[int]] = None,
    num_workers: int = 2,
    distributed: bool = False,
    os_cache: bool = True,
    batches_ahead: int = 2,
    drop_last: Optional[bool] = None,
):
    """An FFCV Loader yielding ``(uint8 NCHW images on device, int64 labels on device)``.

    ``train=True``: random order re-seeded every epoch (``seed + epoch``), last partial batch dropped.
    ``train=False``: sequential order, every image once (plus padding repeats when distributed).
    Images are decoded as a centre square resized to ``res`` x ``res``; views are cut from that.
    ``distributed=True``: this rank's shard, rank and world size from ``torch.distributed``.
    ``os_cache`` / ``batches_ahead``: see the module docstring (page-cache mmap; 2 batches ahead
    keeps the decode threads busy while the step runs without holding more than 3 batches).
    ``path`` may also be an ImageFolder directory: then ``make_torchvision_loader`` serves it.
    """
    if os.path.isdir(path):
        return make_torchvision_loader(path, batch_size, res=res, device=device, train=train, seed=seed,
                                       indices=indices, num_workers=num_workers, distributed=distributed,
                                       drop_last=drop_last)
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

    non_blocking = device.type == "cuda"
    image_pipe = [
        CenterCropRGBImageDecoder((res, res), ratio=1.0),
        ToTensor(),
        ToDevice(device, non_blocking=non_blocking),
        ToTorchImage(channels_last=False),
    ]
    label_pipe = [IntDecoder(), ToTensor(), Squeeze(-1), ToDevice(device, non_blocking=non_blocking)]
    return Loader(
        path,
        batch_size=batch_size,
        num_workers=num_workers,
        os_cache=os_cache,
        order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
        distributed=distributed,
        seed=seed,
        indices=None if indices is None else np.asarray(indices),
        pipelines={"image": image_pipe, "label": label_pipe},
        batches_ahead=batches_ahead,
        drop_last=train if drop_last is None else drop_last,
    )


# --- torchvision fallback (and the benchmark baseline) -------------------------------------------

class _CenterSquare:
    """PIL image -> uint8 CHW tensor of the centre square resized to ``res`` (what FFCV's
    CenterCropRGBImageDecoder with ratio 1 gives)."""

    def __init__(self, res: int):
        self.res = res

    def __call__(self, img):
        from PIL import Image

        img = img.convert("RGB")
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.resize((self.res, self.res), Image.BILINEAR, box=(left, top, left + s, top + s))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _image_folder(root: str, res: int):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(root, transform=_CenterSquare(res) if res else None)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{root} is not an ImageFolder tree (<class>/<image>): {e}") from None


class TorchvisionLoader:
    """``ImageFolder`` + ``DataLoader`` with make_loader's interface: iterating yields
    ``(uint8 NCHW on device, int64 labels on device)``; ``next_epoch`` and ``len`` as FFCV's Loader.
    Order: ``seed + epoch`` permutation, or a ``DistributedSampler`` shard re-seeded per epoch."""

    def __init__(self, dataset, batch_size: int, *, device: torch.device, train: bool, seed: int,
                 indices: Optional[Sequence[int]], num_workers: int, distributed: bool, drop_last: bool):
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.train, self.seed, self.num_workers, self.drop_last = train, seed, num_workers, drop_last
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
        self.distributed = distributed
        self.next_epoch = 0

    def _order(self, epoch: int) -> np.ndarray:
        if self.distributed:
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(self.indices, shuffle=self.train, seed=self.seed, drop_last=False)
            sampler.set_epoch(epoch)
            return self.indices[np.array(list(sampler))]
        if self.train:
            return np.random.default_rng(self.seed + epoch).permutation(self.indices)
        return self.indices

    def __len__(self) -> int:
        n = len(self._order(0))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        from torch.utils.data import DataLoader

        epoch = self.next_epoch
        order = self._order(epoch).tolist()
        self.next_epoch += 1
        cuda = self.device.type == "cuda"
        # Its own generator: a DataLoader draws its base seed from the global RNG when it starts, which
        # would shift the views' stream of a run resumed mid-epoch against the run it continues.
        dl = DataLoader(self.dataset, batch_size=self.batch_size, sampler=order, num_workers=self.num_workers,
                        pin_memory=cuda, drop_last=self.drop_last, persistent_workers=False,
                        prefetch_factor=2 if self.num_workers else None,
                        generator=torch.Generator().manual_seed(self.seed + epoch))
        for x, y in dl:
            yield x.to(self.device, non_blocking=cuda), y.to(self.device, non_blocking=cuda)


def make_torchvision_loader(
    root: str,
    batch_size: int,
    *,
    res: int,
    device: torch.device,
    train: bool,
    seed: int = 0,
    indices: Optional[Sequence[int]] = None,
    num_workers: int = 2,
    distributed: bool = False,
    drop_last: Optional[bool] = None,
) -> TorchvisionLoader:
    """Same batches as ``make_loader`` from an ImageFolder tree, for platforms without ffcv."""
    return TorchvisionLoader(_image_folder(root, res), batch_size, device=device, train=train, seed=seed,
                             indices=indices, num_workers=num_workers, distributed=distributed,
                             drop_last=train if drop_last is None else drop_last)


def read_image(path: str, index: int) -> tuple[np.ndarray, int]:
    """One stored image (HxWx3 uint8, as written) and its label, read straight from the .beton:
    for checking a conversion, not for training."""
    from ffcv.reader import Reader
    from PIL import Image

    reader = Reader(path)
    names = reader.field_names
    meta = reader.metadata[f"f{names.index('image')}"][index]
    label = int(reader.metadata[f"f{names.index('label')}"][index]) if "label" in names else -1
    h, w, ptr = int(meta["height"]), int(meta["width"]), int(meta["data_ptr"])
    size = int(reader.alloc_table["size"][reader.alloc_table["ptr"] == ptr][0])
    with open(path, "rb") as f:
        f.seek(ptr)
        data = f.read(size)
    if int(meta["mode"]) == 1:  # raw
        return np.frombuffer(data, np.uint8)[: h * w * 3].reshape(h, w, 3).copy(), label
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), label
