"""Frozen features, extracted once per (encoder, data, eval transform, init) and cached as .npz.

Every scikit-learn protocol (linear, kNN, low-shot, t-SNE) reads the same arrays, so a backbone runs
over the data once, not once per protocol. The encoder is what ``--checkpoint`` names
(``source.resolve_source``: an sslray checkpoint, an ``sslray export`` folder, or ``timm:<name>``).
The cache file sits beside it (``<checkpoint dir>/features/<init>-<key>.npz``); its key hashes the
encoder's identity (a checkpoint's resolved path, mtime and size; an export's or ``--weights``
file's, with the architecture), each data file's path, mtime and size, the eval transform, the image
subsets, the backbone init (pretrained, or random with its seed), the device type and the precision
the features were computed in, so any change there means a new file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..datasets.loader import DataError, check_same_classes, dataset_info, make_loader, square_note, subset_indices
from ..datasets.views import eval_transform
from ..raytrain.amp import resolve_precision
from ..raytrain.evaluate import RANDOM_INIT_SEED_OFFSET, find_state
from ..raytrain.knn import extract_features
from ..raytrain.session import pick_device

CACHE_VERSION = 1
INITS = ("pretrained", "random_init")


@dataclass
class Features:
    """Features and labels of the train (probe-fit) and val (score) splits for one backbone init."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    classes: list[str]
    init: str
    path: Optional[Path]  # the cache file
    from_cache: bool


def labelled_info(path: str, role: str):
    """``dataset_info`` that also refuses a split without class labels, naming the file."""
    return check_labelled(dataset_info(path), role)


def check_labelled(info, role: str):
    """``info`` (a ``DatasetInfo``) when its split has 2 classes or more, else a DataError naming it."""
    path = info.path
    if info.num_classes == 1:
        raise DataError(f"{role} split {path} has one class only ({info.classes[0]}): a probe needs at least 2 "
                        "classes to tell apart")
    if info.num_classes < 2:
        raise DataError(f"{role} split {path} has no class labels (manifest classes: none); the probes and eval "
                        "protocols need a labelled .beton (convert it from a class-folder source)")
    return info


def _file_id(path: str) -> dict:
    p = Path(path)
    if p.is_dir():  # an ImageFolder tree: an image replaced or added inside a class folder leaves the
        h = hashlib.sha1()  # tree's own mtime and size alone, so every file's size and mtime are hashed
        for f in sorted(p.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        return {"path": str(p.resolve()), "tree": h.hexdigest()}
    st = os.stat(path)
    return {"path": str(p.resolve()), "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def transform_id(t) -> dict:
    """What the eval transform does to an image: resize target and normalisation."""
    return {"type": type(t).__name__, "size": int(t.size),
            "mean": [round(float(v), 6) for v in t.mean.flatten()], "std": [round(float(v), 6) for v in t.std.flatten()]}


def extract_split(backbone, path: str, cfg, device, batch_size: int, indices=None, label: str = "",
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features (float32, N x D) and labels (int64) of ``path``'s images (``indices``, in order;
    None: all), decoded at ``cfg.data.decode_res`` and fed through ``cfg.views``' eval transform in
    ``cfg.train.precision``: what every protocol and ``sslray embed`` score."""
    from tqdm.auto import tqdm

    loader = make_loader(path, batch_size, res=cfg.data.decode_res, device=device, train=False, indices=indices,
                         num_workers=cfg.data.loader_workers)
    batches = tqdm(loader, total=len(loader), desc=f"features {label}".strip(), unit="batch", disable=not progress,
                   leave=False)
    x, y = extract_features(backbone, batches, eval_transform(cfg.views).to(device), device, cfg.train.precision)
    return x.cpu().numpy().astype(np.float32, copy=False), y.cpu().numpy().astype(np.int64, copy=False)


def _indices_id(idx: Optional[np.ndarray]) -> str:
    return "all" if idx is None else hashlib.sha1(np.asarray(idx, dtype=np.int64).tobytes()).hexdigest()[:16]


class FeatureStore:
    """Lazily builds the encoder and extracts (or reads back) features per backbone init.

    ``checkpoint``: what ``--checkpoint`` names, or an ``EncoderSource`` resolved already.
    ``cache_dir`` defaults to ``features/`` beside the checkpoint's state file (an export's folder, a
    ``--weights`` file's folder); ``cache=False`` always extracts and writes nothing.
    """

    def __init__(self, checkpoint, train: str, val: str, *, train_subset: int = 0, val_subset: int = 0,
                 use_gpu: str = "auto", batch_size: int = 512, cache_dir: Optional[str] = None, cache: bool = True,
                 progress: bool = True, log: Callable[[str], None] = print):
        from .source import EncoderSource, resolve_source

        self.train, self.val = str(train), str(val)
        # FileNotFoundError / ValueError naming a path that is not there or is no encoder
        self.source = checkpoint if isinstance(checkpoint, EncoderSource) else resolve_source(
            checkpoint, data=(self.train, self.val))
        self.checkpoint = self.source.name
        self.state_path = self.source.state_path  # None for a source that is no sslray checkpoint
        self.train_info = labelled_info(self.train, "train")
        self.val_info = labelled_info(self.val, "val")
        self._classes = check_same_classes(self.train_info, self.val_info)  # as `sslray probe` and fine-tuning
        self.device = pick_device(0, use_gpu)
        self.batch_size = batch_size
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir else self.source.home / "features"
        self.progress, self.log = progress, log
        if note := square_note(self.train_info, self.val_info):
            log(f"eval: note: {note}")
        self.cfg = self.source.cfg  # the eval settings: transform, decode size, seed, precision, kNN temperature
        self.train_idx = subset_indices(self.train_info.num_images, train_subset, self.cfg.train.seed)
        self.val_idx = subset_indices(self.val_info.num_images, val_subset, self.cfg.train.seed)
        self._mem: dict[str, Features] = {}
        self._fits: dict = {}  # (init, Cs) -> sslray.raytrain.probe.ProbeResult

    @property
    def classes(self) -> list[str]:
        return self._classes

    def key(self, init: str) -> tuple[str, dict]:
        if init not in INITS:
            raise ValueError(f"unknown backbone init {init!r}; expected one of {', '.join(INITS)}")
        parts = {
            "version": CACHE_VERSION, "checkpoint": self.source.identity,
            "init": init if init == "pretrained" else f"random_init(seed={self.cfg.train.seed + RANDOM_INIT_SEED_OFFSET})",
            "train": _file_id(self.train), "val": _file_id(self.val),
            "transform": transform_id(eval_transform(self.cfg.views)), "decode_res": self.cfg.data.decode_res,
            "train_indices": _indices_id(self.train_idx), "val_indices": _indices_id(self.val_idx),
            # bf16 features on a GPU and fp32 features on a CPU differ: each gets its own entry
            "device": self.device.type, "precision": resolve_precision(self.cfg.train.precision, self.device),
        }
        return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16], parts

    def cache_path(self, init: str) -> Path:
        return self.cache_dir / f"{init}-{self.key(init)[0]}.npz"

    def get(self, init: str = "pretrained") -> Features:
        if init in self._mem:
            return self._mem[init]
        path = self.cache_path(init)
        if self.cache and path.exists():
            try:
                with np.load(path, allow_pickle=False) as z:
                    f = Features(z["train_x"], z["train_y"], z["val_x"], z["val_y"], [str(c) for c in z["classes"]], init,
                                 path, True)
                self.log(f"eval: {init} features read from the cache {path}")
                self._mem[init] = f
                return f
            except (OSError, KeyError, ValueError) as e:  # a damaged cache file is rebuilt, not trusted
                self.log(f"eval: ignoring unreadable feature cache {path} ({e})")
        f = self._extract(init)
        if self.cache:
            f.path = self._write(path, f, self.key(init)[1])
        self._mem[init] = f
        return f

    def serves(self, checkpoint: str, train: str, val: str, *, train_subset: int = 0, val_subset: int = 0,
               use_gpu: str = "auto") -> None:
        """A ValueError naming what differs unless this store holds the features a new store for these
        arguments would extract: a caller handed a store must never score another checkpoint's features."""
        if str(checkpoint) != self.checkpoint and (
                self.state_path is None or find_state(checkpoint).resolve() != self.state_path.resolve()):
            raise ValueError(f"the feature store is of {self.source.kind} {self.source.label}, not {checkpoint}")
        for role, given, held in (("train", train, self.train), ("val", val, self.val)):
            if Path(given).resolve() != Path(held).resolve():
                raise ValueError(f"the feature store's {role} split is {held}, not {given}")
        seed = self.cfg.train.seed
        for role, n, held in (("train", train_subset, self.train_idx), ("val", val_subset, self.val_idx)):
            info = self.train_info if role == "train" else self.val_info
            if _indices_id(subset_indices(info.num_images, n, seed)) != _indices_id(held):
                raise ValueError(f"the feature store holds another {role} subset than {role}_subset={n}")
        if pick_device(0, use_gpu) != self.device:
            raise ValueError(f"the feature store's features are computed on {self.device}, not for use_gpu={use_gpu}")

    def release(self, init: str) -> None:
        """Forget ``init``'s features (its linear fits stay): a caller done with them frees their memory
        before the next init's are extracted (ImageNet's train features are ~10 GB per init)."""
        self._mem.pop(init, None)

    def fitted(self, init: str, cs=(1.0,)) -> bool:
        from ..raytrain.probe import linear_cs

        return (init, linear_cs(cs)) in self._fits

    def linear(self, init: str = "pretrained", cs=(1.0,)):
        """The linear probe on ``get(init)`` (seeded by the checkpoint's train.seed), fitted once per store
        and C setting ``cs`` (``fit_linear_probe``: one C, or the best of several on held-out train features).
        The end-of-run probe of ``sslray pretrain --eval linear`` and the ``linear`` protocol read this one
        fit: the same model on the same features, logged once as ``probe_linear_*`` and once as ``eval_linear_*``."""
        from ..raytrain.probe import fit_linear_probe, linear_cs  # scikit-learn: only where a probe is fitted

        key = (init, linear_cs(cs))
        if key not in self._fits:
            f = self.get(init)
            self._fits[key] = fit_linear_probe(f.train_x, f.train_y, f.val_x, f.val_y, f.classes, cs=key[1],
                                               seed=self.cfg.train.seed)
        return self._fits[key]

    def backbone(self, init: str):
        return self.source.backbone(init).to(self.device)  # an unknown init: the source's ValueError

    def _split(self, backbone, path: str, indices, label: str):
        return extract_split(backbone, path, self.cfg, self.device, self.batch_size, indices, label, self.progress)

    def _extract(self, init: str) -> Features:
        if init == "pretrained":
            self.log(self.source.describe())
        self.log(f"eval: extracting {init} features of {self.source.label} ...")
        bb = self.backbone(init)
        tx, ty = self._split(bb, self.train, self.train_idx, f"{init} train")
        vx, vy = self._split(bb, self.val, self.val_idx, f"{init} val")
        return Features(tx, ty, vx, vy, list(self.classes), init, None, False)

    def _write(self, path: Path, f: Features, parts: dict) -> Optional[Path]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez(tmp, train_x=f.train_x, train_y=f.train_y, val_x=f.val_x, val_y=f.val_y,
                     classes=np.array(f.classes), meta=np.array(json.dumps(parts)))
            os.replace(tmp, path)  # never a half-written cache file
            return path
        except OSError as e:
            self.log(f"eval: could not write the feature cache {path} ({e}); pass --cache-dir to keep features")
            return None
