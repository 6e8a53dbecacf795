"""A run's folder under its storage: its name, the checks that it can be written (here and from every
node), the run file that names its MLflow run, how far its checkpoints got, and ``--restart``'s move
aside of an earlier run."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Optional

from ..config import Config
from ..storage import RUN_FILE, exists, filesystem, is_remote, join, move_tree, read_text, write_text


def run_name(cfg: Config) -> str:
    data = re.sub(URI_UNSAFE, "_", Path(cfg.data.train).stem)  # "my set.beton": the name is a path part
    return cfg.tracking.run_name or f"{cfg.method.name}-{cfg.model.backbone}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"


# Characters a URI parser reads as something else: "#" starts a fragment and "?" a query (both cut off),
# "%" an escape, whitespace a syntax error. Ray Train joins the run name to the storage root as a plain
# path, while sslray's helpers parse "<storage>/<name>" as one URI: with these in a name on object
# storage the two would use different folders (a --restart could move another run's files).
URI_UNSAFE = r"[#?%\s]"


def check_remote_name(storage: str, name: str) -> None:
    """On ``s3://`` / ``gs://`` storage, a run name and storage URI without URI-special characters."""
    if not is_remote(storage):
        return
    for key, value in (("ray.name (--name)", name), ("ray.storage (--storage)", storage)):
        bad = sorted(set(re.findall(URI_UNSAFE, value)))
        if bad:
            shown = ", ".join("a space" if c.isspace() else repr(c) for c in bad)
            raise StorageError(f"{key} {value!r} holds {shown}: on object storage a URI would cut it short or "
                               "misread it; use letters, digits, '-', '_' and '.'")


class StorageError(RuntimeError):
    """The checkpoint storage cannot be used; raised before any training starts."""


def check_storage(storage: str, name: str) -> str:
    """Create ``storage/name`` and prove it is writable; returns the run folder URI/path."""
    target = f"{storage.rstrip('/')}/{name}"
    try:
        fs, path = filesystem(target)
        fs.create_dir(path, recursive=True)
        probe = f"{path}/.sslray-write-probe"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:  # any filesystem failure means the run would lose its checkpoints
        raise StorageError(f"checkpoint storage {target} is not writable ({type(e).__name__}: {e}); "
                           "give --storage a writable folder, a shared mount, or s3://bucket/prefix") from None
    return target


def check_storage_on_nodes(run_dir: str, cpus_per_worker: float = 1.0, use_gpu: bool = False,
                           timeout: float = 60.0) -> None:
    """A local storage path must be one folder for every node a worker may run on (a shared mount):
    ``check_storage`` wrote only on this machine, and Ray's own check comes with the first checkpoint,
    a whole epoch later. A file written here must be visible from each other node that can hold a
    worker (its CPUs, and a GPU when the workers take one); a CPU-less head or a CPU-only node of a
    GPU job is not asked."""
    if is_remote(run_dir):
        return
    import ray

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n.get("NodeID") != here
              and n.get("Resources", {}).get("CPU", 0) >= cpus_per_worker
              and (not use_gpu or n.get("Resources", {}).get("GPU", 0) >= 1)]
    if not others:
        return
    marker = Path(run_dir) / f".sslray-node-probe-{os.getpid()}-{time.time_ns()}"
    marker.write_text("ok")
    try:
        blind = nodes_without(str(marker), others, timeout)
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise StorageError(f"checkpoint storage {run_dir} is a folder of this machine that node(s) "
                           f"{', '.join(blind)} cannot see: the first checkpoint would fail there. Give --storage "
                           f"a folder mounted on every node at the same path, or s3://bucket/prefix")


def nodes_without(path: str, nodes: list[dict], timeout: float) -> list[str]:
    """The addresses of ``nodes`` (``ray.nodes()`` entries) where ``path`` does not exist; a node that
    does not answer within ``timeout`` (busy, starting) is not counted."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def sees(p: str) -> bool:
        return os.path.exists(p)

    refs = {n.get("NodeManagerAddress", n["NodeID"][:12]): sees.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path) for n in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    done = set(ready)
    return sorted(addr for addr, ref in refs.items() if ref in done and not ray.get(ref))


def read_run_file(run_dir: str) -> Optional[dict]:
    import json

    where = join(run_dir, RUN_FILE)
    text = read_text(where)
    if text is None:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:  # e.g. emptied by a kill mid-write
        raise StorageError(f"{where} is not valid JSON ({e}): it names the MLflow run this run folder logs to; "
                           "fix or delete it (the run then logs to a new MLflow run), or start over with "
                           "--restart") from None
    if not isinstance(info, dict) or "run_id" not in info:
        raise StorageError(f"{where} names no MLflow run (no 'run_id'); delete it or start over with --restart")
    return info


def write_run_file(run_dir: str, info: dict) -> None:
    import json

    write_text(join(run_dir, RUN_FILE), json.dumps(info))


def move_aside(run_dir: str) -> Optional[str]:
    """``--restart``: keep the old run (never delete a user's checkpoints), start a fresh one. The
    old folder becomes ``<name>.old-<time>`` beside it (on object storage: copied there, then removed)."""

    base, i = f"{run_dir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}", 1
    dest = base
    while exists(dest):  # two restarts within a second: never merge into (or fail on) the earlier copy
        i += 1
        dest = f"{base}-{i}"
    if is_remote(run_dir):
        return dest if move_tree(run_dir, dest) else None
    p = Path(run_dir)
    if not p.exists():
        return None
    p.rename(dest)
    return dest


def run_location(cfg: Config) -> tuple[str, str, str]:
    """``(name, storage, run_dir)`` of the run ``cfg`` describes (a local storage made absolute)."""
    name = cfg.ray.name or run_name(cfg)
    storage = cfg.ray.storage if "://" in cfg.ray.storage else str(Path(cfg.ray.storage).expanduser().resolve())
    return name, storage, f"{storage.rstrip('/')}/{name}"


def completed_epochs(run_dir: str) -> Optional[int]:
    """The epochs the newest checkpoint in ``run_dir`` has completed (``epoch_0003`` and the mid-epoch
    ``epoch_0003.250000_step_...`` both: 3), or None when it holds no checkpoint."""
    from ..storage import checkpoint_order, newest_file

    try:
        if is_remote(run_dir):
            newest = newest_file(run_dir, "state.pt")
        else:  # a newest file cut short (a node lost mid-copy) is passed over, as probe/eval/export do
            from .evaluate import find_state

            newest = str(find_state(run_dir))
    except (FileNotFoundError, OSError, ValueError):
        return None
    key = checkpoint_order(newest.rstrip("/").split("/")[-2])
    return key[2] if key[0] == 1 else None


def resumes(cfg: Config, restart: bool = False) -> bool:
    """Whether ``pretrain(cfg)`` continues an earlier run of the same name and storage."""
    return not restart and bool(cfg.ray.name) and read_run_file(run_location(cfg)[2]) is not None


def remove_if_empty(run_dir: str) -> None:
    import pyarrow.fs as pafs

    try:
        fs, path = filesystem(run_dir)
        if not fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            fs.delete_dir(path)
    except OSError:
        pass  # an unreachable store: the folder (if any) stays; nothing in it is lost either way
