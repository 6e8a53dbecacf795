"""`sslray doctor`: is this machine ready for the job? Say what is missing and how to fix it.

Every check runs under a time limit (a thread, or a subprocess for ``ray.init``), so an address that
never answers costs seconds, not a hang. A check belongs to a group (``ffcv``, ``mlflow``, ``storage``,
``ray``, ``gpu``, ``data``, or ``core`` for what every job needs); the exit status is 1 only when a
group the job needs (``--need``) has a FAIL. Probes clean up after themselves, except that MLflow
only soft-deletes: a deleted ``sslray-doctor-*`` experiment stays in the store until ``mlflow gc``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional
from urllib import error as urlerror
from urllib import parse, request

from .rayhead import local_head, stale_message, tcp_open

NEEDS = ("gpu", "ray", "mlflow", "storage", "ffcv")
DEFAULT_NEED = ("ffcv", "mlflow", "storage")  # + ray when an address is given, + data when --data is
PACKAGES = {  # import name -> (distribution, group)
    "torch": ("torch", "core"), "torchvision": ("torchvision", "core"), "timm": ("timm", "core"),
    "ray": ("ray", "ray"), "ffcv": ("ffcv", "ffcv"), "mlflow": ("mlflow", "mlflow"),
    "kornia": ("kornia", "core"), "sklearn": ("scikit-learn", "core"),
}
RAY_PORT, DASHBOARD_PORT = 6379, 8265


@dataclass
class Check:
    name: str
    status: str  # OK | WARN | FAIL
    detail: str
    fix: str = ""
    group: str = "core"


def timed(fn: Callable, seconds: float):
    """``fn()`` in a daemon thread; TimeoutError if it has not returned after ``seconds``."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300]}" if msg else type(e).__name__


# -- python, packages, ffcv ---------------------------------------------------------------------

def check_packages() -> list[Check]:
    v = sys.version_info
    out = [Check("python", "OK" if v >= (3, 10) else "FAIL", f"{sys.version.split()[0]} at {sys.executable}",
                 "" if v >= (3, 10) else "use Python 3.10 or newer")]
    for mod, (dist, group) in PACKAGES.items():
        try:
            out.append(Check(mod, "OK", metadata.version(dist), group=group))
        except metadata.PackageNotFoundError:
            out.append(Check(mod, "FAIL", f"{dist} is not installed in {sys.prefix}",
                             f"pip install -e . (or pip install {dist})", group))
    return out


def ffcv_roundtrip() -> str:
    """Write two 8x8 JPEGs to a .beton and read them back: proves ffcv, numba and the JPEG decoder."""
    import numpy as np

    from .datasets import compile_cache

    compile_cache.enable()  # as every sslray process that reads data does
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.writer import DatasetWriter

    images = [np.full((8, 8, 3), c, np.uint8) for c in ((200, 40, 40), (40, 40, 200))]
    with tempfile.TemporaryDirectory(prefix="sslray-doctor-") as d:
        path = os.path.join(d, "probe.beton")
        writer = DatasetWriter(path, {"image": RGBImageField(write_mode="jpg"), "label": IntField()}, num_workers=1)
        with contextlib.redirect_stderr(io.StringIO()):  # no progress bar for two images
            writer.from_indexed_dataset([(im, i) for i, im in enumerate(images)])
        loader = Loader(path, batch_size=2, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
        batch_images, _ = next(iter(loader))
        del loader
    got = np.asarray(batch_images)
    if got.shape != (2, 8, 8, 3):
        raise RuntimeError(f"decoded batch has shape {got.shape}, expected (2, 8, 8, 3)")
    err = float(np.abs(got.astype(np.float32) - np.stack(images)).mean())
    if err > 20:
        raise RuntimeError(f"decoded JPEG pixels are off by {err:.0f}/255 on average")
    return f"wrote and decoded 2 JPEGs through a .beton (mean error {err:.1f}/255)"


def check_ffcv(timeout: float) -> list[Check]:
    try:
        return [Check("ffcv decode", "OK", timed(ffcv_roundtrip, timeout), group="ffcv")]
    except Exception as e:  # noqa: BLE001 - every failure is reported, none is fatal here
        fix = ("ffcv needs libturbojpeg and opencv at build time: install them (conda install -c conda-forge "
               "libjpeg-turbo opencv, or apt install libturbojpeg0-dev libopencv-dev), then pip install ffcv==1.0.2")
        return [Check("ffcv decode", "FAIL", f"ffcv cannot write/read a JPEG .beton: {_err(e)}", fix, "ffcv")]


# -- GPU and process-group backends -------------------------------------------------------------

def check_gpu(need_gpu: bool) -> list[Check]:
    try:
        import torch
        import torch.distributed as dist
    except Exception as e:  # noqa: BLE001
        return [Check("gpu", "FAIL", f"torch does not import: {_err(e)}", "pip install torch", "core")]
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n:
        from .raytrain.amp import resolve_precision

        names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
        precs = sorted({resolve_precision("auto", torch.device("cuda", i)) for i in range(n)})
        amp = " + ".join(p + (" with loss scaling" if p == "fp16" else "") for p in precs)
        out = [Check("gpu", "OK", f"{n} visible: {', '.join(names)} (CUDA {torch.version.cuda}); "
                                  f"train.precision=auto trains in {amp}", group="gpu")]
    else:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f"CUDA_VISIBLE_DEVICES={cvd!r}" if cvd is not None else (
            "torch is a CPU build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}")
        out = [Check("gpu", "FAIL" if need_gpu else "WARN", f"no CUDA GPU visible ({why}); training runs on CPU",
                     "check nvidia-smi, CUDA_VISIBLE_DEVICES and that torch is a CUDA build", "gpu")]
    nccl = dist.is_available() and dist.is_nccl_available()
    if nccl:
        out.append(Check("nccl", "OK", "available (GPU DDP)", group="gpu"))
    else:
        out.append(Check("nccl", "FAIL" if (need_gpu or n) else "WARN", "NCCL backend not available: no GPU DDP",
                         "install a CUDA build of torch (it ships NCCL)", "gpu"))
    gloo = dist.is_available() and dist.is_gloo_available()
    out.append(Check("gloo", "OK" if gloo else "FAIL", "available (CPU DDP)" if gloo else "gloo backend not available",
                     "" if gloo else "reinstall torch from pytorch.org wheels", "core"))
    return out


# -- Ray: cluster, resources, job server, auth --------------------------------------------------

def split_address(address: str) -> tuple[str, str, int]:
    """``host[:port]``, ``ray://host:port``, ``http://host:port`` -> (scheme, host, port)."""
    scheme = address.split("://", 1)[0] if "://" in address else ""
    u = parse.urlsplit(address if scheme else f"//{address}")
    default = {"ray": 10001, "http": DASHBOARD_PORT, "https": DASHBOARD_PORT}.get(scheme, RAY_PORT)
    return scheme, u.hostname or "127.0.0.1", u.port or default


def ray_token() -> tuple[Optional[str], str, Optional[str]]:
    """(token, where it came from, why it cannot be read): the lookup `sslray submit` makes, so the two
    never disagree; the token is never printed."""
    from .submit import SubmitError, find_token

    try:
        token, source = find_token(os.environ)
    except SubmitError as e:
        return None, os.environ.get("RAY_AUTH_TOKEN_PATH", ""), str(e)
    return token, (source if token else ""), None


_RAY_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], include_dashboard=False, configure_logging=False, log_to_driver=False)
print("SSLRAY-DOCTOR " + json.dumps({"resources": ray.cluster_resources(),
      "nodes": sum(1 for n in ray.nodes() if n.get("Alive")), "version": ray.__version__}))
ray.shutdown()
"""


def check_ray(address: str, dashboard: Optional[str], timeout: float) -> list[Check]:
    scheme, host, port = split_address(address)
    out: list[Check] = []
    mode = os.environ.get("RAY_AUTH_MODE", "")
    token, source, unreadable = ray_token()
    if unreadable:
        out.append(Check("ray auth", "FAIL", unreadable, "point RAY_AUTH_TOKEN_PATH at the cluster's token file, or "
                         "unset it to use ~/.ray/auth_token", "ray"))
    elif mode.lower() == "token" and not token:
        out.append(Check("ray auth", "FAIL", "RAY_AUTH_MODE=token but no token in $RAY_AUTH_TOKEN, "
                         "$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token", "copy the cluster's token to ~/.ray/auth_token "
                         "(`ray get-auth-token` on the head node)", "ray"))
    else:
        shown = mode or "unset (connects without a token)"
        out.append(Check("ray auth", "OK", f"RAY_AUTH_MODE={shown}; token: {source or 'none'}", group="ray"))

    if address != "auto":
        why = tcp_open(host, port, min(timeout, 3.0))
        if why:
            return out + [Check("ray cluster", "FAIL", f"no Ray cluster answers at {address} ({host}:{port}: {why})",
                                "start one (`ray start --head --port=6379`) or pass the head node's address "
                                "to --address / RAY_ADDRESS", "ray")]
    if scheme in ("http", "https"):
        out.append(Check("ray cluster", "WARN", f"{address} is a dashboard/job-server address; ray.init needs "
                         f"the GCS address ({host}:{RAY_PORT}) or ray://{host}:10001",
                         f"use --address {host}:{RAY_PORT} for `sslray pretrain`", "ray"))
    else:
        try:
            p = subprocess.run([sys.executable, "-c", _RAY_PROBE, address], capture_output=True, text=True,
                               timeout=timeout * 3, check=False)
            line = [x for x in p.stdout.splitlines() if x.startswith("SSLRAY-DOCTOR ")]
            if p.returncode or not line:
                last = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
                raise RuntimeError(last[:300])
            info = json.loads(line[-1].split(" ", 1)[1])
            res = info["resources"]
            gpus = res.get("GPU", 0)
            detail = (f"Ray {info['version']} at {address}: {info['nodes']} node(s), {res.get('CPU', 0):g} CPU, "
                      f"{gpus:g} GPU, {res.get('memory', 0) / 2**30:.1f} GiB memory")
            out.append(Check("ray cluster", "OK", detail, group="ray"))
        except subprocess.TimeoutExpired:
            out.append(Check("ray cluster", "FAIL", f"ray.init({address!r}) did not finish within {timeout * 3:g} s",
                             "check the head node is healthy (`ray status` there) and ports 6379/10001 are open", "ray"))
        except Exception as e:  # noqa: BLE001
            hint = "" if mode.lower() == "token" else "; a token-auth cluster also needs RAY_AUTH_MODE=token here"
            out.append(Check("ray cluster", "FAIL", f"cannot connect to Ray at {address}: {_err(e)}",
                             "match the cluster's Ray and Python versions; check the auth token" + hint, "ray"))

    job_host = "127.0.0.1" if address == "auto" else host  # "auto": the head on this machine
    url = dashboard or (address if scheme in ("http", "https") else f"http://{job_host}:{DASHBOARD_PORT}")
    url = url.rstrip("/")
    req = request.Request(url + "/api/version", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with request.urlopen(req, timeout=min(timeout, 5.0)) as r:
            v = json.loads(r.read().decode() or "{}").get("ray_version", "?")
        out.append(Check("ray job server", "OK", f"{url} answers (Ray {v})", group="ray"))
    except urlerror.HTTPError as e:
        auth = e.code in (401, 403)
        out.append(Check("ray job server", "FAIL" if auth else "WARN", f"{url} answered HTTP {e.code}",
                         "set RAY_AUTH_TOKEN or ~/.ray/auth_token to the cluster's token" if auth else
                         "is this the Ray dashboard? pass --dashboard URL", "ray"))
    except Exception as e:  # noqa: BLE001
        out.append(Check("ray job server", "WARN", f"no job server at {url}: {_err(e)}; `ray job submit` will not work",
                         "start the head with the dashboard (`ray start --head --dashboard-host=0.0.0.0`) "
                         "or pass --dashboard URL", "ray"))
    return out


def check_local_ray(a) -> list[Check]:
    """No address given: what a plain ``ray.init()`` does here (join this machine's `ray start` head, or start one)."""
    head = local_head(min(a.timeout, 3.0))
    if head is None:
        return [Check("ray cluster", "OK", "no --address and RAY_ADDRESS unset: `sslray pretrain` starts a local Ray",
                      group="ray")]
    if head.dead:
        return [Check("ray cluster", "WARN", stale_message(head) + " sslray starts a local Ray instead; other Ray "
                      "tools on this machine will still wait on it.", "ray stop", "ray")]
    out = check_ray(head.address, a.dashboard, a.timeout)
    for c in out:
        if c.name == "ray cluster" and c.status == "OK":
            c.detail += (f" (the head `ray start` started on this machine, named in {head.file}; "
                         "a plain ray.init() joins it)")
    return out


# -- MLflow, storage, disk ----------------------------------------------------------------------

def local_writable(path: Path) -> Optional[str]:
    """None when a file can be created at ``path`` (or in its nearest existing parent, where the job
    would create it), else why not, naming the path."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{path} cannot be a folder: {p} is a file"
    try:
        with tempfile.NamedTemporaryFile(dir=p, prefix=".sslray-doctor-"):
            pass
    except OSError as e:
        return f"cannot write in {p}: {e.strerror or _err(e)}"
    return None


class _env:
    """Set environment variables for a block (MLflow reads its HTTP retry policy from them)."""

    def __init__(self, **kv: str):
        self.kv, self.old = kv, {}

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.kv}
        os.environ.update(self.kv)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def mlflow_probe(uri: str) -> str:
    """Create a run in a fresh experiment, log to it, delete both (MLflow deletes softly)."""
    from .tracking import _client

    c = _client(uri)
    exp = c.create_experiment(f"sslray-doctor-{uuid.uuid4().hex[:10]}")
    try:
        run = c.create_run(exp)
        c.log_metric(run.info.run_id, "doctor_probe", 1.0)
        c.delete_run(run.info.run_id)
    finally:
        c.delete_experiment(exp)
    return f"{uri}: created, wrote and deleted a probe experiment"


def check_mlflow(uri_arg: Optional[str], timeout: float) -> list[Check]:
    from .tracking import resolve_uri

    uri = resolve_uri(uri_arg)
    fix = "pass a reachable, writable --tracking-uri (or set MLFLOW_TRACKING_URI)"
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if scheme in ("sqlite", "file"):
        if scheme == "sqlite":
            db = Path(uri[len("sqlite:///"):])
            folder = db.parent
        else:  # MLflow's file store: a folder
            db = folder = Path(parse.unquote(parse.urlsplit(uri).path) if "://" in uri else uri)
        if scheme == "sqlite" and not folder.is_dir():
            return [Check("mlflow", "FAIL", f"tracking URI {uri}: folder {folder} does not exist", f"mkdir -p {folder}, "
                          "or " + fix, "mlflow")]
        why = local_writable(folder)
        if why:
            return [Check("mlflow", "FAIL", f"tracking URI {uri}: {why}", fix, "mlflow")]
        if not db.exists() or scheme == "file":
            return [Check("mlflow", "OK", f"{uri}: {folder} is writable; the store is created on the first run",
                          group="mlflow")]
        if not os.access(db, os.R_OK | os.W_OK):
            return [Check("mlflow", "FAIL", f"tracking URI {uri}: the database file is not writable", fix, "mlflow")]
    elif scheme in ("http", "https"):
        u = parse.urlsplit(uri)
        port = u.port or (443 if scheme == "https" else 80)
        why = tcp_open(u.hostname or "127.0.0.1", port, min(timeout, 3.0))
        if why:
            return [Check("mlflow", "FAIL", f"tracking URI {uri} is not reachable ({u.hostname}:{port}: {why})",
                          f"start the server (`mlflow server --host 0.0.0.0 --port {port}`), or " + fix, "mlflow")]
    try:
        with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout))):
            return [Check("mlflow", "OK", timed(lambda: mlflow_probe(uri), timeout * 2), group="mlflow")]
    except Exception as e:  # noqa: BLE001
        return [Check("mlflow", "FAIL", f"tracking URI {uri} is not writable: {_err(e)}", fix, "mlflow")]


def remote_probe(uri: str) -> str:
    from .storage import filesystem as open_fs

    filesystem, root = open_fs(uri)
    probe = f"{root.rstrip('/')}/.sslray-doctor-{uuid.uuid4().hex[:10]}"
    with filesystem.open_output_stream(probe) as f:
        f.write(b"ok")
    filesystem.delete_file(probe)
    return f"{uri}: wrote and deleted a probe file"


def check_storage(storage: Optional[str], timeout: float) -> list[Check]:
    from .config import RayConfig

    storage = storage or RayConfig().storage
    fix = "pass a writable --storage (a folder every Ray node can reach, or s3:// / gs://)"
    if "://" not in storage:
        path = Path(storage).expanduser().resolve()
        why = local_writable(path)
        if why:
            return [Check("storage", "FAIL", f"storage {path} is not writable: {why}", fix, "storage")]
        return [Check("storage", "OK", f"{path} is writable" + ("" if path.exists() else " (created by the run)"),
                      group="storage")]
    try:
        import pyarrow.fs  # noqa: F401
    except ImportError:
        return [Check("storage", "WARN", f"storage {storage} cannot be checked: pyarrow is not installed",
                      "pip install pyarrow to check it here", "storage")]
    try:
        return [Check("storage", "OK", timed(lambda: remote_probe(storage), timeout * 2), group="storage")]
    except Exception as e:  # noqa: BLE001
        return [Check("storage", "FAIL", f"storage {storage} is not writable: {_err(e)}",
                      "check the bucket name and credentials (AWS_*/GOOGLE_APPLICATION_CREDENTIALS), or " + fix,
                      "storage")]


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_data(data: str, storage: Optional[str]) -> list[Check]:
    from .datasets import ConversionError, DataError, dataset_info, manifest_path

    try:
        info = dataset_info(data)
    except (DataError, ConversionError) as e:
        return [Check("data", "FAIL", str(e), "convert it with `sslray convert SRC OUT.beton`", "data")]
    size = os.path.getsize(data)
    places = {"temp": tempfile.gettempdir()}
    if storage and "://" not in storage:
        p = Path(storage).expanduser().resolve()
        while not p.exists() and p != p.parent:
            p = p.parent
        places["storage"] = str(p)
    free = {k: shutil.disk_usage(v).free for k, v in places.items()}
    # What the job will read, as convert wrote it: labels and how non-square images were stored.
    kind = f"{info.num_classes} class{'es' * (info.num_classes != 1)}" if info.classes else "unlabelled"
    if manifest_path(data).is_file():  # a folder, or a .beton converted elsewhere, says nothing of it
        kind += f", --square {info.square}"
    detail = f"{data}: {info.num_images} images, {kind}, {_gib(size)}; free: " + ", ".join(
        f"{_gib(f)} in {places[k]} ({k})" for k, f in free.items())
    low = min(free.values())
    if low < size:
        return [Check("disk", "FAIL", detail, "free disk space or point TMPDIR/--storage at a larger disk", "data")]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    if low < 2 * size or (ram and size > ram):
        why = "less than twice the file free" if low < 2 * size else f"larger than RAM ({_gib(ram)}): no page cache"
        return [Check("disk", "WARN", f"{detail}; {why}", "free disk space, or use a smaller --max-res", "data")]
    return [Check("disk", "OK", detail, group="data")]


# -- the command --------------------------------------------------------------------------------

def parse_need(text: Optional[str], address: Optional[str], data: Optional[str]) -> set[str]:
    if text is None:
        need = set(DEFAULT_NEED) | ({"ray"} if address else set())
    else:
        need = {n.strip() for n in text.split(",") if n.strip()}
        bad = need - set(NEEDS)
        if bad:
            raise ValueError(f"--need: unknown {', '.join(sorted(bad))} (choose from {', '.join(NEEDS)})")
    return need | {"core"} | ({"data"} if data else set())


def run_checks(a) -> list[Check]:
    """All checks for the parsed arguments ``a``, in table order."""
    address = a.address or os.environ.get("RAY_ADDRESS")
    need = parse_need(a.need, address, a.data)
    skip = {s.strip() for s in (a.skip or "").split(",") if s.strip()}
    steps: list[tuple[str, Callable[[], list[Check]]]] = [
        ("ffcv", lambda: check_ffcv(a.timeout * 12)),  # first numba compile of a Loader takes a while
        ("gpu", lambda: check_gpu("gpu" in need)),
        ("ray", lambda: check_ray(address, a.dashboard, a.timeout) if address else check_local_ray(a)),
        ("mlflow", lambda: check_mlflow(a.tracking_uri, a.timeout)),
        ("storage", lambda: check_storage(a.storage, a.timeout)),
        ("data", lambda: check_data(a.data, a.storage) if a.data else []),
    ]
    bad = skip - {g for g, _ in steps}
    if bad:
        raise ValueError(f"--skip: unknown {', '.join(sorted(bad))} (choose from {', '.join(g for g, _ in steps)})")
    out = check_packages()
    for group, step in steps:
        if group in skip:
            out.append(Check(group, "WARN", "not checked (--skip)", group=group))
            continue
        try:
            out.extend(step())
        except Exception as e:  # noqa: BLE001 - a broken check is itself a finding
            out.append(Check(group, "FAIL", f"the check itself failed: {_err(e)}", group=group))
    return out


def blocking(checks: list[Check], need: set[str]) -> list[Check]:
    return [c for c in checks if c.status == "FAIL" and c.group in need]


def render(checks: list[Check], need: set[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    colour = {"OK": "green", "WARN": "yellow", "FAIL": "red"}
    t = Table(title="sslray doctor", show_lines=False)
    for col in ("check", "status", "detail", "how to fix"):
        t.add_column(col, overflow="fold")
    for c in checks:
        t.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail, c.fix)
    Console(width=None if sys.stdout.isatty() else 160).print(t)
    # The same findings as plain lines: greppable, never wrapped mid-path.
    for c in checks:
        if c.status != "OK":
            tail = "" if c.group in need or c.status == "WARN" else " (not needed by this job)"
            print(f"{c.status} {c.name}: {c.detail}{tail}" + (f" -> fix: {c.fix}" if c.fix else ""))


def cmd_doctor(a) -> int:
    address = a.address or os.environ.get("RAY_ADDRESS")
    need = parse_need(a.need, address, a.data)
    checks = run_checks(a)
    render(checks, need)
    bad = blocking(checks, need)
    wanted = ", ".join(sorted(need - {"core"}))
    if bad:
        print(f"sslray doctor: {len(bad)} problem(s) block a job that needs {wanted}: "
              + ", ".join(c.name for c in bad))
        return 1
    print(f"sslray doctor: ready for a job that needs {wanted}")
    return 0


def register(sub) -> None:
    d = sub.add_parser("doctor", help="check this machine, the Ray cluster, MLflow and storage before a run")
    d.add_argument("--address", help="Ray cluster address (host:6379, ray://host:10001; default $RAY_ADDRESS)")
    d.add_argument("--dashboard", help="Ray job server URL (default http://<address host>:8265)")
    d.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    d.add_argument("--storage", help="checkpoint storage: folder, shared mount, s3:// or gs:// (default ./runs)")
    d.add_argument("--data", help="a .beton the job reads: checked, and free disk compared with its size")
    d.add_argument("--need", help=f"comma list of what the job needs, from {','.join(NEEDS)} "
                                  "(default ffcv,mlflow,storage, plus ray with an address)")
    d.add_argument("--skip", help="comma list of checks not to run: ffcv,gpu,ray,mlflow,storage,data")
    d.add_argument("--timeout", type=float, default=10.0,
                   help="seconds per network check (ffcv gets 12x, joining a Ray cluster 3x)")
    d.set_defaults(func=cmd_doctor)
