"""Per-worker FFCV loaders: each JPEG is decoded once on the CPU, uint8 batches go to the device.

Views are made on the device afterwards (``sslray.datasets.views``), so the loader's only job is
decode + copy. ffcv 1.0.2 has no per-field multi-view mapper, which is why one decode feeds all
views.

Memory: with ``os_cache=True`` the .beton is memory-mapped and shared by every worker on a node
through the page cache, so RAM use is about the file size once, not once per worker. With
``os_cache=False`` FFCV keeps its own per-process cache of pages it needs. ``--max-res`` at
conversion bounds the per-image size and therefore both the file and the decode buffers.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .convert import read_manifest


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

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def dataset_info(path: str) -> DatasetInfo:
    """Read the .beton's manifest (or its header when converted elsewhere)."""
    if not path:
        raise DataError("no dataset given (expected a .beton written by `sslray convert`)")
    if not os.path.exists(path):
        raise DataError(f"dataset {path} does not exist; convert it first with `sslray convert SRC {path}`")
    manifest = read_manifest(path)
    if manifest is not None:
        if manifest.get("beton_bytes") not in (None, os.path.getsize(path)):
            raise DataError(f"{path} does not match its manifest (size differs): the conversion did not finish")
        return DatasetInfo(path, int(manifest["num_images"]), list(manifest["classes"]))
    from ffcv.reader import Reader

    try:
        reader = Reader(path)
    except Exception as e:
        raise DataError(f"{path} is not a readable .beton: {e}") from None
    labels = reader.alloc_table["label"] if "label" in (reader.alloc_table.dtype.names or ()) else None
    n = int(reader.num_samples)
    k = int(np.max(labels)) + 1 if labels is not None and len(labels) else 0
    return DatasetInfo(path, n, [str(i) for i in range(k)])


def subset_indices(n: int, limit: int, seed: int = 0) -> Optional[np.ndarray]:
    """First-``limit`` indices would be class-sorted for ImageFolder data, so take a seeded random
    subset instead: every class is represented in proportion."""
    if not limit or limit >= n:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=limit, replace=False))


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
    """
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
