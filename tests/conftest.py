"""Shared fixtures: real CIFAR-10 subsets from ../shared/data, and one Ray cluster per session."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR_ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.gz"
IMAGENETTE_ARCHIVE = SHARED_DATA / "imagenette2-224.tar.gz"


def require_archive(archive: Path) -> None:
    """Skip a test whose shared dataset is not on this machine, but fail under CI
    (``SSLRAY_REQUIRE_DATA=1``, set by .ci/run): ~60 tests need the archives, and a CI machine
    without them would otherwise pass with those tests quietly skipped."""
    if archive.exists():
        return
    if os.environ.get("SSLRAY_REQUIRE_DATA") == "1":
        pytest.fail(f"{archive} not found (SSLRAY_REQUIRE_DATA=1: the shared datasets must be beside the repo)")
    pytest.skip(f"{archive} not found")

# Ray forwards its processes' log lines to the driver's stdout/stderr ("(raylet) ...", "(Worker pid=1)
# ...") whenever they come, also in the middle of a test that reads what a command printed (a raylet
# warned the disk was 95% full during a CLI test). Tests that check a message's exact start or line
# count read the captured text through this.
_RAY_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?:raylet|[^)\n]*pid=\d+[^)\n]*)\)")


def drop_ray_lines(text: str) -> str:
    """``text`` without the lines Ray forwarded from its own processes."""
    return "".join(line for line in text.splitlines(keepends=True) if not _RAY_LINE.match(line))


# Ray Train's controller polls its workers every 2 s by default; a finished run, a report or a dead
# worker is seen only at the next poll. The suite runs ~60 short Ray Train runs, so it polls every
# 0.5 s (set before Ray starts: the driver passes it on to controllers and workers, and CLI
# subprocesses inherit it). The runs and the assertions are otherwise unchanged.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Each run's worker group also starts a PreemptionWatcher actor (one more Python process importing
# ray.train, ~2.5 s of CPU on a 2-core machine) that polls for nodes being drained; a local test
# cluster is never drained, so the suite runs without it (Ray passes this on the same way).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """The shared CIFAR-10 archive extracted once per session (ImageFolder: train/, test/)."""
    require_archive(CIFAR_ARCHIVE)
    root = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(CIFAR_ARCHIVE) as tf:
        tf.extractall(root, filter="data")
    return root


def make_subset(src: Path, dst: Path, per_class: int) -> Path:
    """Copy the first ``per_class`` images of every class: a small real ImageFolder tree."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        out = dst / cls.name
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copy2(f, out / f.name)
    return dst


@pytest.fixture(scope="session")
def cifar_small(cifar_root, tmp_path_factory) -> dict:
    """Real CIFAR-10 subsets converted to .beton: 100/class train (1,000), 30/class test (300)."""
    from sslray.datasets import WriteParams, convert

    base = tmp_path_factory.mktemp("cifar_small")
    out = {}
    for split, n in (("train", 100), ("test", 30)):
        tree = make_subset(cifar_root / split, base / "tree" / split, n)
        beton = base / f"{split}.beton"
        convert(tree, beton, params=WriteParams(max_resolution=32), workers=2, verbose=False)
        out[split] = str(beton)
        out[f"{split}_tree"] = tree
    return out


@pytest.fixture(scope="session")
def tiny_betons(tmp_path_factory) -> dict:
    """Readable train/val .betons of 64 generated 8-px images in 2 classes (val: 8): for the checks
    `sslray pretrain` makes on the data's headers before Ray starts, where the pixels do not matter."""
    from PIL import Image

    from sslray.datasets import WriteParams, convert

    root = tmp_path_factory.mktemp("tiny_betons")
    for split, n in (("train", 32), ("val", 4)):
        for k, cls in enumerate(("cat", "dog")):
            (root / "src" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (60 * k + i, 100, 7 * i % 256)).save(root / "src" / split / cls / f"{i}.png")
    out = {}
    for split in ("train", "val"):
        out[split] = str(root / f"{split}.beton")
        convert(root / "src", out[split], split=split, params=WriteParams(max_resolution=8), workers=1, verbose=False)
    return out


SORTED_CLASSES, SORTED_PER_CLASS = 4, 6  # sorted_beton: image i is of class i // SORTED_PER_CLASS


@pytest.fixture(scope="session")
def sorted_beton(tmp_path_factory) -> str:
    """A class-sorted .beton (as every converted dataset is) of 24 8-px images, each a solid colour of
    its own: what a picture drawn from its first images shows (one class) is seen at a glance."""
    from PIL import Image

    from sslray.datasets import WriteParams, convert

    root = tmp_path_factory.mktemp("sorted_beton")
    for k in range(SORTED_CLASSES):
        (root / "src" / f"c{k}").mkdir(parents=True)
        for i in range(SORTED_PER_CLASS):
            Image.new("RGB", (8, 8), (60 * k, 40 * i, 200)).save(root / "src" / f"c{k}" / f"{i}.png")
    out = root / "sorted.beton"
    convert(root / "src", out, params=WriteParams(max_resolution=8), workers=1, verbose=False)
    return str(out)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, above all on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_checkpoint(cifar_small: dict, root: Path, experiment: str, overrides: Sequence[str] = ()) -> dict:
    """A checkpoint trained for 2 SimCLR steps in one process (no Ray), inside a run folder that names an
    MLflow run the way `sslray pretrain` does (sslray_run.json), for the probe and eval tests."""
    import json

    from sslray.config import load_config
    from sslray.raytrain.loop import run_local
    from sslray.tracking import Tracker

    cfg = load_config("smoke", [f"data.train={cifar_small['train']}", "data.val=", "train.epochs=1",
                                "train.max_steps_per_epoch=2", "ray.use_gpu=false", *overrides])
    run_local(cfg, str(root / "run" / "checkpoints"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker.start(uri, experiment, "tiny")
    (root / "run" / "sslray_run.json").write_text(json.dumps({"run_id": tracker.run_id, "tracking_uri": uri}))
    state = next((root / "run" / "checkpoints").glob("epoch_*/state.pt"))
    return {"state": state, "run_dir": root / "run", "uri": uri, "run_id": tracker.run_id,
            "train": cifar_small["train"], "val": cifar_small["test"]}


def count_work(monkeypatch) -> dict:
    """Frozen-feature passes (one per split and init) and linear-probe fits, wherever they are made:
    ``{"extract": n, "fit": n}``, counted from this call on."""
    from sslray.eval import features, protocols
    from sslray.raytrain import probe

    calls = {"extract": 0, "fit": 0}
    real_extract, real_fit = features.extract_features, probe.linear_probe

    def extract(*a, **k):
        calls["extract"] += 1
        return real_extract(*a, **k)

    def fit(*a, **k):
        calls["fit"] += 1
        return real_fit(*a, **k)

    monkeypatch.setattr(features, "extract_features", extract)
    for mod in (probe, protocols):
        monkeypatch.setattr(mod, "linear_probe", fit)
    return calls


def tb_events(folder) -> dict:
    """What TensorBoard would show from the event files under ``folder``: ``{"scalars": {tag: [(step,
    value), ...] in writing order}, "texts": {tag: text}, "images": {tag: (height, width)}}``, read with the protobufs
    the writer uses (TFRecord framing: length, its crc, the event, its crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict = {"scalars": {}, "texts": {}, "images": {}}
    for f in sorted(Path(folder).rglob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("image"):
                    out["images"][v.tag] = (v.image.height, v.image.width)
                elif v.metadata.plugin_data.plugin_name == "text":
                    out["texts"][v.tag.removesuffix("/text_summary")] = v.tensor.string_val[0].decode()
                else:
                    out["scalars"].setdefault(v.tag, []).append((event.wall_time, event.step, v.simple_value))
    # in the order they were written, across the files of several processes (as TensorBoard merges them)
    out["scalars"] = {tag: [(step, value) for _, step, value in sorted(points, key=lambda p: p[0])]
                      for tag, points in out["scalars"].items()}
    return out


@pytest.fixture
def finetune_folders(monkeypatch, tmp_path) -> list:
    """The temporary Ray run folders fine-tuning makes (``tempfile.mkdtemp``), made under ``tmp_path``
    and listed, so a test can check they are gone after the run."""
    from sslray.raytrain import finetune

    made: list = []

    def mkdtemp(prefix=""):
        made.append(tmp_path / f"{prefix}{len(made)}")
        made[-1].mkdir()
        return str(made[-1])

    monkeypatch.setattr(finetune.tempfile, "mkdtemp", mkdtemp)
    return made


@pytest.fixture
def no_ray(monkeypatch):
    """This process as a fresh CLI sees it: no Ray started here and none to connect to (so the workers
    would run on this machine), and starting Ray fails the test: for checks that must come first."""
    import ray

    from sslray.raytrain import trainer

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the session's shared Ray may be up
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(trainer, "local_head", lambda *a, **k: None)
    monkeypatch.setattr(trainer, "ensure_ray", lambda *a, **k: pytest.fail("Ray was started"))


@pytest.fixture
def poison_loss(monkeypatch):
    """``poison_loss(k)``: SimCLR's loss turns NaN on its k-th call (1-based), in this process."""
    from sslray.raytrain.methods import simclr

    def arm(at_call: int) -> None:
        real, calls = simclr.nt_xent_loss, {"n": 0}

        def poisoned(*a, **k):
            calls["n"] += 1
            out = real(*a, **k)
            return out * float("nan") if calls["n"] == at_call else out

        monkeypatch.setattr(simclr, "nt_xent_loss", poisoned)

    return arm


class S3:
    """A local S3 endpoint (moto's server) with the AWS_* variables that point pyarrow, and so Ray Train's
    storage and sslray's, at it; ``bucket(name)`` makes a bucket and returns ``s3://name``."""

    ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
           "AWS_EC2_METADATA_DISABLED")

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "sslray-test",
                    "AWS_SECRET_ACCESS_KEY": "sslray-test", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}
        self.saved = {k: os.environ.get(k) for k in self.ENV}
        os.environ.update(self.env)

    def bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        self.server.stop()
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server():
    """One local S3 for the session (started before the Ray cluster, whose workers inherit its env)."""
    pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the dev extra)")
    server = S3()
    yield server
    server.stop()


@pytest.fixture
def gcs(monkeypatch):
    """A local Google Cloud Storage (gcp-storage-emulator, in memory) behind every ``gs://`` location
    that ``sslray.storage`` opens; ``bucket(name)`` makes a bucket and returns ``gs://name``. pyarrow
    reaches an emulator only through explicit options (anonymous, http, endpoint), so the test swaps
    them into ``storage.filesystem``; everything above it runs as it does against GCS."""
    server_mod = pytest.importorskip("gcp_storage_emulator.server", reason="the GCS tests need gcp-storage-emulator")
    import socket

    import pyarrow.fs as pafs

    from sslray import storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    fs = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=f"127.0.0.1:{port}",
                            retry_time_limit=datetime.timedelta(seconds=5), project_id="sslray-test")
    real = storage.filesystem
    monkeypatch.setattr(storage, "filesystem", lambda loc: (fs, str(loc)[len("gs://"):].rstrip("/"))
                        if str(loc).startswith("gs://") else real(loc))

    class GCS:
        @staticmethod
        def bucket(name: str) -> str:
            fs.create_dir(name)
            return f"gs://{name}"

    yield GCS()
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(request):
    """One local Ray instance for the whole session (starting Ray costs ~10 s each time). Its workers
    get the session's local S3 endpoint too, so runs can use ``--storage s3://...``."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    try:
        s3_env = request.getfixturevalue("s3_server").env
    except pytest.skip.Exception:  # no moto: every Ray test but the S3 one still runs
        s3_env = {}
    if not ray.is_initialized():
        # Workers unpickle test-module functions: put tests/ and the repo on their path.
        path = os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path, **s3_env}})
    yield ray
    ray.shutdown()
