"""Where the training loop runs: inside a Ray Train worker, or as one plain process.

The loop only talks to a ``Session`` (rank, device, restore, report), so the same code is tested
and timed on a bare GPU machine without Ray, and runs under Ray Train unchanged.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from . import distributed as D

STATE_FILE = "state.pt"


def pick_device(local_rank: int = 0, use_gpu: str = "auto") -> torch.device:
    if str(use_gpu).lower() in ("false", "0", "no") or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


def save_state(state: dict, directory: str | os.PathLike) -> Path:
    path = Path(directory) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never a half-written state file
    return path


def load_state(directory: str | os.PathLike, device: torch.device) -> dict:
    return torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=False)


PICTURES_DIR = "pictures"  # beside the checkpoints: PNGs rank 0 draws, logged to MLflow by the driver


def write_picture(folder: str, name: str, png: bytes) -> str:
    """Write ``folder/name`` (a local folder or a pyarrow URI such as s3://...) under a temporary name
    first, so the driver never logs half a file."""
    from ..storage import filesystem

    fs, path = filesystem(folder)
    fs.create_dir(path, recursive=True)
    target, tmp = f"{path}/{name}", f"{path}/.{name}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(png)
    fs.move(tmp, target)
    return target


class LocalSession:
    """One process, or a torchrun-style process group already initialised by the caller.

    Checkpoints go to ``ckpt_dir/epoch_XXXX/state.pt``; ``restore`` loads the newest.
    """

    def __init__(self, ckpt_dir: Optional[str] = None, use_gpu: str = "auto", printer=print,
                 pictures_dir: Optional[str] = None, keep: int = 0):
        self.rank = D.rank()
        self.world_size = D.world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = pick_device(self.local_rank, use_gpu)
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        self.history: list[dict] = []
        self.printer = printer
        self.pictures_dir = pictures_dir or (str(self.ckpt_dir / PICTURES_DIR) if self.ckpt_dir else None)
        self.pictures: dict[str, bytes] = {}  # name -> PNG, also kept in memory (tests, notebooks)
        self.keep = keep  # newest checkpoints kept (ray.num_to_keep, as Ray keeps them); 0 = all

    def restore(self) -> Optional[dict]:
        if not self.ckpt_dir or not self.ckpt_dir.exists():
            return None
        from ..storage import checkpoint_order

        done = sorted((p for p in self.ckpt_dir.glob("epoch_*") if (p / STATE_FILE).exists()),
                      key=lambda p: checkpoint_order(p.name))
        return load_state(done[-1], self.device) if done else None

    def report(self, metrics: dict[str, Any], state: Optional[dict] = None) -> None:
        self.history.append(dict(metrics))
        if state is not None and self.ckpt_dir is not None and self.rank == 0:
            from .loop import checkpoint_name

            d = self.ckpt_dir / checkpoint_name(metrics)
            d.mkdir(parents=True, exist_ok=True)
            save_state(state, d)
            if self.keep:
                self._prune()
        if self.world_size > 1:  # a barrier, as ray.train.report is: no rank restores before rank 0 has saved
            D.barrier()

    def _prune(self) -> None:
        """Remove all but the ``keep`` newest checkpoints (after the newest is written whole)."""
        import shutil

        from ..storage import checkpoint_order

        done = sorted((p for p in self.ckpt_dir.glob("epoch_*") if (p / STATE_FILE).exists()),
                      key=lambda p: checkpoint_order(p.name))
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def log(self, msg: str) -> None:
        if self.rank == 0:
            self.printer(msg, flush=True)

    def save_picture(self, name: str, png: bytes) -> None:
        if self.rank != 0:
            return
        self.pictures[name] = png
        if self.pictures_dir:
            write_picture(self.pictures_dir, name, png)

    keeps_pictures = True  # in memory at least


def quiet_report_echo() -> None:
    """Ray Train logs every ``ray.train.report`` at INFO, metrics dict included (~1.5 kB per rank and
    epoch), under a logger named by its module's file path, so ``RunConfig(logging_config=...)``
    (which filters ``ray.train.*``) does not reach it. The run prints its own epoch line with the same
    figures; those echoes are dropped here, in the worker. Warnings and errors still show."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class RaySession:
    """Inside a Ray Train worker (Train V2): rank from the train context, checkpoints via report."""

    def __init__(self, use_gpu: str = "auto", pictures_dir: Optional[str] = None):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.device = pick_device(self.local_rank, use_gpu)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.pictures_dir = pictures_dir
        quiet_report_echo()

    def restore(self) -> Optional[dict]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_state(d, self.device)

    def report(self, metrics: dict[str, Any], state: Optional[dict] = None) -> None:
        import ray.train

        # report() is a barrier on every rank; only rank 0 hands over a checkpoint. Each rank says
        # which node it runs on, so the driver can record where the workers were placed.
        metrics = {**metrics, "node_id": self.node_id}
        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="sslray-ckpt-") as d:
            save_state(state, d)
            from .loop import checkpoint_name

            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=checkpoint_name(metrics))

    def log(self, msg: str) -> None:
        # Straight to the process's stdout (which Ray streams to the driver): Ray Train patches
        # print() in workers to go to its logger and, where stdout is wrapped, to stdout as well,
        # which printed every progress line twice.
        if self.rank == 0:
            print(msg, file=sys.__stdout__, flush=True)

    def save_picture(self, name: str, png: bytes) -> None:
        """Rank 0 writes the PNG into the run's storage folder; the driver's MLflow callback logs it
        after the next report (workers never write to MLflow)."""
        if self.rank == 0 and self.pictures_dir:
            write_picture(self.pictures_dir, name, png)

    @property
    def keeps_pictures(self) -> bool:
        """False inside Tune trials and other runs without a pictures folder: nothing is drawn."""
        return bool(self.pictures_dir)
