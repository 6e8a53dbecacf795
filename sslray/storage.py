"""Run storage that may be a local folder, a shared mount, or object storage (``s3://``, ``gs://``...).

Ray Train writes checkpoints wherever ``--storage`` points, through pyarrow's filesystems. Everything
that reads a checkpoint afterwards (the probe, ``sslray eval``, ``sslray export``, ``--init-weights``)
wants a local file, so a remote one is copied into a local cache that mirrors its path
(``<cache>/<scheme>/<bucket>/<key>``) and is read from there; the copy is used again while the remote
file keeps its size and modification time. The mirror keeps the run folder's
``sslray_run.json`` beside the checkpoint, so a copied checkpoint still finds its MLflow run. It
keeps one checkpoint per run: fetching a newer one drops the copies of the older ones (the bucket
keeps every original).
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional

CACHE_ENV = "SSLRAY_CACHE_DIR"
RUN_FILE = "sslray_run.json"  # beside Ray's checkpoints: which MLflow run this training run writes to
CHUNK = 8 << 20


def is_remote(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def absolute(location: Optional[str]) -> Optional[str]:
    """A local path made absolute (workers may run with another cwd); URIs and empty values as given."""
    return str(Path(location).expanduser().resolve()) if location and not is_remote(location) else location


def filesystem(location: str | os.PathLike):
    """``(pyarrow filesystem, path)`` for a local path (made absolute) or a URI such as ``s3://b/k``."""
    import pyarrow.fs as pafs

    s = str(location)
    return pafs.FileSystem.from_uri(s if is_remote(s) else str(Path(s).expanduser().resolve()))


def join(location: str, *parts: str) -> str:
    return "/".join([str(location).rstrip("/"), *parts])


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: str) -> Optional[str]:
    """The text of a small file (local or URI), or None if it is not there."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except FileNotFoundError:
        return None
    except OSError:  # some stores say "not found" with a plain OSError; anything else is a real failure
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise


def write_text(location: str, text: str) -> None:
    """Write a small file (local or URI), creating its folder."""
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{os.getpid()}"  # then renamed: a kill mid-write never leaves a truncated file
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, path)


def list_files(location: str, pattern: str = "*") -> list[str]:
    """Names of the files directly in a folder (local or URI) that match ``pattern``, sorted."""
    import fnmatch

    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern))


def checkpoint_uri(checkpoint, storage: str) -> Optional[str]:
    """The location of a Ray ``Checkpoint`` as the user gave the storage: pyarrow paths drop the scheme
    (``bucket/runs/x``), so a remote one gets ``storage``'s scheme back (``s3://bucket/runs/x``)."""
    if checkpoint is None:
        return None
    if is_remote(storage) and not is_remote(checkpoint.path):
        return f"{storage.split('://', 1)[0]}://{checkpoint.path}"
    return checkpoint.path


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sslray").expanduser() / "remote"


def local_mirror(uri: str) -> Path:
    scheme, rest = uri.split("://", 1)
    return cache_root() / scheme / rest.strip("/")


def remote_source(local: str | os.PathLike) -> Optional[str]:
    """The URI a file in the local mirror was copied from, or None for any other path."""
    root, p = cache_root().resolve(), Path(local).resolve()
    if root not in p.parents:
        return None
    scheme, *rest = p.relative_to(root).parts
    return f"{scheme}://{'/'.join(rest)}"


def _up_to_date(dest: Path, size: int, mtime_ns: Optional[int]) -> bool:
    """Whether the mirror's copy is the remote file as it is now: same size and same modification time
    (a copy takes the remote's mtime when it is fetched). Size alone is not enough: a checkpoint saved
    again after ``--restart``, a backbone exported again and ``sslray_run.json`` all keep their size.
    A filesystem that reports no mtime gives nothing to tell a rewrite from the copy, so its files are
    always fetched again, big ones too: a stale checkpoint is silently wrong, a second download only
    slow (pyarrow's local, S3, GCS and HDFS filesystems all report one). S3's mtime is to the second,
    so a same-size rewrite within the second of the copy's original write is not seen."""
    if mtime_ns is None or not dest.is_file():
        return False
    st = dest.stat()
    return st.st_size == size and st.st_mtime_ns == mtime_ns


def _download(fs, info, dest: Path, label: str) -> None:
    """One file (a pyarrow ``FileInfo``), unless the mirror already holds it as it is now; written under a
    unique temporary name, given the remote's mtime and renamed, so workers of one node that fetch the
    same file at once never see half of it."""
    from tqdm import tqdm

    size, mtime_ns = info.size, info.mtime_ns
    if _up_to_date(dest, size, mtime_ns):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with fs.open_input_stream(info.path) as src, open(tmp, "wb") as out, \
                tqdm(total=size, unit="B", unit_scale=True, desc=f"sslray: fetching {label}", leave=False,
                     disable=size < 64 * CHUNK) as bar:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(uri: str) -> Path:
    """A local copy of a remote file, or of every file under a remote folder; a local path is returned
    as it is. Raises FileNotFoundError naming ``uri`` when nothing is there."""
    if not is_remote(uri):
        return Path(uri)
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    dest = local_mirror(uri)
    if info.type == pafs.FileType.File:
        _download(fs, info, dest, uri)
        return dest
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri} not found")
    for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if f.type == pafs.FileType.File:
            _download(fs, f, dest / Path(f.path).relative_to(path), f"{uri}/{Path(f.path).name}")
    return dest


def check_one_run(found: list[str], where: str) -> None:
    """``found``: the checkpoint files below the folder ``where``, as paths relative to it. They must be
    one run's: a run folder is the parent of its checkpoint folders. Under the storage root, or a run
    beside its ``--restart``-moved ``<name>.old-<time>``, the newest checkpoint across them all could
    be another run's, so this raises a ValueError naming the runs (up to 10) and asking for one."""
    runs = sorted({posixpath.dirname(posixpath.dirname(f)) for f in found})
    if len(runs) < 2:
        return
    where = str(where).rstrip("/")
    names = [r or f"{where} itself" for r in runs]
    shown = ", ".join(names[:10]) + (f" (+{len(names) - 10} more)" if len(names) > 10 else "")
    example = join(where, runs[0]) if runs[0] else join(where, runs[1])
    raise ValueError(f"{where} holds the checkpoints of {len(runs)} runs: {shown}; give one run folder "
                     f"(such as {example}), or a checkpoint folder or state file inside it")


_CKPT_NAME = re.compile(r"epoch_(\d+)(?:\.(\d+))?(?:_step_(\d+))?$")


def checkpoint_order(folder_name: str) -> tuple:
    """Sort key of a checkpoint folder in training order: ``epoch_0003`` (3 epochs done), then the
    4th epoch's mid-epoch checkpoints by the fraction done (``epoch_0003.250000_step_0000412``).
    An earlier version's ``epoch_0003_step_0000412`` (no fraction) sorts before this version's in
    the same epoch: after an upgrade, only new-style names are written from where it left off. Other
    names (Ray's ``checkpoint_000004``) sort by name, before every ``epoch_`` name."""
    m = _CKPT_NAME.match(folder_name)
    if not m:
        return (0, folder_name, -1, -1, -1)
    epoch, frac, step = m.groups()
    mid = frac is not None or step is not None
    return (1, "", int(epoch), int(mid), int(frac) if frac is not None else -1, int(step or 0))


def newest_file(uri: str, name: str) -> str:
    """``uri`` itself if it is the file ``name``; ``uri/name`` if that exists; else the newest ``name``
    below ``uri`` (ordered by its folder's name, then time, as checkpoints ``epoch_0002`` sort)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    scheme = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""  # a local path is its own answer
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return uri
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri} not found")
    if fs.get_file_info(f"{path.rstrip('/')}/{name}").type == pafs.FileType.File:
        return join(uri, name)
    found = [f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
             if f.type == pafs.FileType.File and f.base_name == name]
    if not found:
        raise FileNotFoundError(f"no checkpoint ({name}) under {uri}")
    base = path.rstrip("/") + "/"
    check_one_run([f.path[len(base):] if f.path.startswith(base) else f.path for f in found], uri)
    best = max(found, key=lambda f: (checkpoint_order(Path(f.path).parent.name), f.mtime_ns or 0))
    return scheme + best.path


def fetch_checkpoint(uri: str, state_file: str) -> Path:
    """The local copy of the newest checkpoint at or under ``uri`` (its whole folder), with the run
    folder's ``sslray_run.json`` beside it when there is one. Returns the local ``state_file``."""
    state = newest_file(uri, state_file)
    folder = state.rsplit("/", 1)[0]
    local = fetch(folder) / state_file
    _drop_older_copies(local.parent, state_file)
    run_file = join(folder.rsplit("/", 1)[0], RUN_FILE)
    try:
        fetch(run_file)
    except FileNotFoundError:
        pass  # a checkpoint copied by hand outside a run folder: the probe then has no run to log to
    return local


def _drop_older_copies(folder: Path, state_file: str) -> None:
    """Remove the cached copies of the same run's older checkpoints (names sort by epoch and step)."""
    for sib in folder.parent.iterdir():
        if sib.is_dir() and checkpoint_order(sib.name) < checkpoint_order(folder.name) and (sib / state_file).is_file():
            shutil.rmtree(sib, ignore_errors=True)


def move_tree(uri: str, dest: str) -> bool:
    """Move every file under the remote folder ``uri`` to ``dest`` (object stores cannot rename a
    prefix): copy each (server-side), check that each copy is there at its size, and only then delete
    the originals. Returns False when nothing is at ``uri``; raises OSError naming a file that did not
    arrive, with the originals left in place."""
    import pyarrow.fs as pafs
    from tqdm import tqdm

    fs, path = filesystem(uri)
    _, dest_path = filesystem(dest)
    if dest_path == path or dest_path.startswith(path.rstrip("/") + "/"):
        raise OSError(f"moving {uri} to {dest}: the destination is the folder itself or inside it ({dest_path}); "
                      "nothing was moved")
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return False
    if fs.get_file_info(dest_path).type != pafs.FileType.NotFound:
        raise OSError(f"moving {uri} to {dest}: {dest} already exists; nothing was moved")
    files = [f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if f.type == pafs.FileType.File]
    moved = [(f, dest_path + f.path[len(path):]) for f in files]
    for f, to in tqdm(moved, desc=f"sslray: moving {uri}", unit="file", leave=False, disable=len(moved) < 20):
        if fs.type_name == "local":  # object stores have no folders to make; a local (file://) one does
            fs.create_dir(to.rsplit("/", 1)[0], recursive=True)
        fs.copy_file(f.path, to)
    for f, to in moved:
        got = fs.get_file_info(to)
        if got.type != pafs.FileType.File or got.size != f.size:
            raise OSError(f"moving {uri} to {dest}: {f.path} was not copied whole ({got.size} of {f.size} bytes); "
                          "the originals are kept")
    for f, _ in moved:  # only what was copied: a file written meanwhile (a job still running) stays
        fs.delete_file(f.path)
    left = [f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if f.type == pafs.FileType.File]
    if left:
        print(f"sslray: {len(left)} file(s) appeared under {uri} while it was moved (is a job still writing "
              f"there?); they were left in place")
    else:
        fs.delete_dir(path)
    return True


def upload(local: str | os.PathLike, uri: str) -> str:
    """Copy a local file to ``uri`` (any pyarrow location), under a temporary name first."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.part"
    with open(local, "rb") as src, fs.open_output_stream(tmp) as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
    fs.move(tmp, path)
    return uri


__all__ = ["RUN_FILE", "absolute", "cache_root", "check_one_run", "checkpoint_order", "checkpoint_uri", "exists",
           "fetch", "fetch_checkpoint", "filesystem", "is_remote", "join", "list_files", "local_mirror", "move_tree",
           "newest_file", "read_text", "remote_source", "upload", "write_text"]
