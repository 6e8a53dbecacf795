"""A worker's data: the checks the splits' headers allow before any image is read (``plan_data``, also
run by ``sslray pretrain`` before Ray starts), and the train, kNN-bank and val loaders of one rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..config import Config
from ..datasets.loader import DataError, check_same_classes, dataset_info, eval_slice, make_loader, subset_indices
from ..datasets.resident import make_resident_loader
from .accum import plan_steps


@dataclass
class Data:
    train: object
    bank: object
    val: object
    num_classes: int
    steps_per_epoch: int  # optimizer steps; each takes train.accum_steps loader batches
    # The whole kNN bank and val split as (path, indices or None for all, images in the file): rank 0's
    # pictures draw spread samples of them (RunPictures), as its own loaders hold one slice each.
    bank_split: Optional[tuple] = None
    val_split: Optional[tuple] = None


@dataclass
class DataPlan:
    """What the data's headers decide before any image is read: the splits, the training subset, the
    per-worker batch and the class list."""
    train_info: object
    val_info: object
    train_idx: Optional[np.ndarray]
    n_train: int
    per_worker: int
    classes: list

    def notes(self, d) -> list[str]:
        """Subsets asked for beyond what the splits hold (``d``: the data config): all is used then,
        said once (the run's params keep the number asked for)."""
        out = []
        val_n = self.val_info.num_images if self.val_info is not None else None
        for key, asked, have in (("data.train_subset", d.train_subset, self.train_info.num_images),
                                 ("data.val_subset", d.val_subset, val_n),
                                 ("data.knn_bank", d.knn_bank, self.n_train if val_n is not None else None)):
            if have is not None and asked > have:
                out.append(f"{key} {asked} is more than the {have} images there: all {have} are used")
        return out


def plan_data(cfg: Config, world: int, check_batch: bool = True) -> DataPlan:
    """The checks the workers would otherwise make after Ray started: readable splits with the same
    classes, labels where the kNN monitor and online probe need them, a batch that divides over the
    workers and fits the data. ``sslray pretrain`` runs it before Ray (without the batch checks under
    ``data.auto_batch``, where the loop picks the batch); every worker runs it again."""
    d = cfg.data
    if check_batch and d.batch_size % world:
        raise ValueError(f"config key 'data.batch_size' ({d.batch_size}) must divide evenly over {world} workers")
    train_info = dataset_info(d.train)
    val_info = dataset_info(d.val) if d.val else None
    classes = train_info.classes
    if val_info is not None:
        for key, info in (("data.val", val_info), ("data.train", train_info)):
            if not info.classes:
                raise DataError(f"{key}={info.path} has no class labels, but a val split is given: the kNN monitor and "
                                "the online probe score the val images against labelled training images. Drop "
                                "data.val (--val) to pretrain without labels, or convert that split from class folders")
        classes = check_same_classes(train_info, val_info)
    train_idx = subset_indices(train_info.num_images, d.train_subset, cfg.train.seed)
    n_train = train_info.num_images if train_idx is None else len(train_idx)
    per_worker = d.batch_size // world
    if check_batch and n_train // world < per_worker:
        raise ValueError(
            f"data.batch_size {d.batch_size} is larger than the {n_train} training images allow over {world} workers"
        )
    k = cfg.train.accum_steps
    if check_batch and k > 1 and n_train // world < per_worker * k:
        raise ValueError(f"config key 'train.accum_steps' ({k}) times data.batch_size {d.batch_size} is more than the "
                         f"{n_train} training images allow over {world} workers: no optimizer step would be taken")
    return DataPlan(train_info, val_info, train_idx, n_train, per_worker, classes)


def build_data(cfg: Config, session) -> Data:
    d, world = cfg.data, session.world_size
    plan = plan_data(cfg, world)
    for note in plan.notes(d):
        session.log(f"sslray: note: {note}")
    train_info, val_info, train_idx, n_train, per_worker = (plan.train_info, plan.val_info, plan.train_idx,
                                                            plan.n_train, plan.per_worker)
    common = dict(res=d.decode_res, device=session.device, num_workers=d.loader_workers, distributed=world > 1,
                  os_cache=d.os_cache, batches_ahead=d.batches_ahead)
    load = make_resident_loader if d.resident else make_loader
    train = load(d.train, per_worker, train=True, seed=cfg.train.seed, indices=train_idx, **common)
    bank = val = bank_split = val_split = None
    classes = plan.classes
    if val_info is not None:
        bank_n = d.knn_bank or n_train
        bank_idx = train_idx if bank_n >= n_train else (
            subset_indices(train_info.num_images, bank_n, cfg.train.seed) if train_idx is None
            else np.sort(np.random.default_rng(cfg.train.seed + 1).choice(train_idx, bank_n, replace=False)))
        val_idx = subset_indices(val_info.num_images, d.val_subset, cfg.train.seed)
        eval_bs = max(per_worker, 256)
        # Each rank scores its own slice, every image once: a distributed loader pads the last shard with
        # repeats, which the kNN monitor and the online probe would count twice.
        ev = {**common, "distributed": False}
        r = (session.rank, world)
        bank = load(d.train, eval_bs, train=False, indices=eval_slice(bank_idx, train_info.num_images, *r), **ev)
        val = load(d.val, eval_bs, train=False, indices=eval_slice(val_idx, val_info.num_images, *r), **ev)
        bank_split, val_split = (d.train, bank_idx, train_info.num_images), (d.val, val_idx, val_info.num_images)
    steps, note = plan_steps(len(train), cfg.train.accum_steps, cfg.train.max_steps_per_epoch)
    if note:
        session.log(f"sslray: note: {note}")
    return Data(train, bank, val, len(classes), steps, bank_split, val_split)
