"""`sslray doctor`: each missing or unreachable piece is reported by name, and the exit status follows
what the job needs. Only loopback addresses; closed ports come from binding and releasing a socket."""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from conftest import drop_ray_lines
from sslray import doctor, rayhead
from sslray.cli import main

FAST = ["--skip", "ffcv,gpu"]  # the ffcv round trip (numba compile) is covered by the slow test


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):  # RAY_AUTH_MODE stays: a local ray.init may have set it
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def bare_home(monkeypatch, tmp_path) -> Path:
    """A HOME without ~/.ray/auth_token, whatever this machine has."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    return home


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now: connects are refused at once
    return port


@contextmanager
def http_server(status: int, body: dict):
    """A loopback HTTP server answering every GET/POST with ``status`` and ``body``."""

    class H(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def run(capsys, *argv) -> tuple[int, str]:
    rc = main(["doctor", *argv])
    return rc, drop_ray_lines(capsys.readouterr().out)


def healthy_args(tmp_path) -> list[str]:
    return ["--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]


# -- must show: the three missing pieces ----------------------------------------------------------

def test_healthy_run_exits_zero(tmp_path, capsys):
    rc, out = run(capsys, *FAST, *healthy_args(tmp_path))
    assert rc == 0, out
    assert "ready for a job that needs ffcv, mlflow, storage" in out
    assert "FAIL" not in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()  # doctor leaves no trace


def test_tracking_uri_in_missing_folder_fails_and_names_it(tmp_path, capsys):
    uri = "sqlite:////nonexistent-dir/x.db"
    rc, out = run(capsys, *FAST, "--storage", str(tmp_path), "--tracking-uri", uri)
    assert rc == 1
    line = next(x for x in out.splitlines() if x.startswith("FAIL mlflow"))
    assert uri in line and "/nonexistent-dir does not exist" in line and "fix:" in line
    assert "block a job" in out.splitlines()[-1] and "mlflow" in out.splitlines()[-1]


def test_tracking_uri_on_closed_port_fails_fast_and_names_it(tmp_path, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    rc, out = run(capsys, *FAST, "--storage", str(tmp_path), "--tracking-uri", uri)
    assert time.monotonic() - t0 < 5
    assert rc == 1
    line = next(x for x in out.splitlines() if x.startswith("FAIL mlflow"))
    assert uri in line and "not reachable" in line and "mlflow server" in line


def test_storage_under_a_file_fails_and_names_the_path(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    storage = tmp_path / "afile" / "sub"
    rc, out = run(capsys, *FAST, "--storage", str(storage), "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert rc == 1
    line = next(x for x in out.splitlines() if x.startswith("FAIL storage"))
    assert str(storage) in line and f"{tmp_path / 'afile'} is a file" in line


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody can write into: a read-only tmpfs mount when running as root (root ignores
    mode bits), else a mode 0500 folder."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        import subprocess

        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
        if r.returncode:
            pytest.skip(f"root writes into mode-0500 folders and a read-only mount failed: {r.stderr.decode().strip()}")
        try:
            yield ro
        finally:
            subprocess.run(["umount", str(ro)], check=False)
    else:
        ro.chmod(0o500)
        try:
            yield ro
        finally:
            ro.chmod(0o700)


def test_read_only_storage_folder_fails(read_only_folder, capsys, tmp_path):
    storage = read_only_folder / "runs"
    [c] = doctor.check_storage(str(storage), 5)
    assert c.status == "FAIL" and str(read_only_folder) in c.detail
    rc, out = run(capsys, *FAST, "--storage", str(storage), "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert rc == 1 and any(x.startswith("FAIL storage") and str(read_only_folder) in x for x in out.splitlines())
    assert not storage.exists()


def test_no_ray_cluster_at_address_fails_fast_and_names_it(tmp_path, capsys):
    address = f"127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    rc, out = run(capsys, *FAST, *healthy_args(tmp_path), "--address", address)
    assert time.monotonic() - t0 < 5
    assert rc == 1  # an address makes ray a need
    line = next(x for x in out.splitlines() if x.startswith("FAIL ray cluster"))
    assert f"no Ray cluster answers at {address}" in line and "ray start --head" in line


def test_ray_address_from_environment_is_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    rc, out = run(capsys, *FAST, *healthy_args(tmp_path))
    assert rc == 1 and "FAIL ray cluster" in out


def test_failure_outside_need_is_reported_but_does_not_fail(tmp_path, capsys):
    address = f"127.0.0.1:{closed_port()}"
    rc, out = run(capsys, *FAST, *healthy_args(tmp_path), "--address", address, "--need", "mlflow,storage")
    assert rc == 0
    assert "FAIL ray cluster" in out and "(not needed by this job)" in out


def test_unknown_need_is_a_usage_error(tmp_path, capsys):
    assert main(["doctor", *FAST, "--need", "gpu,teleport"]) == 2
    assert "teleport" in capsys.readouterr().err


def test_unknown_skip_is_a_usage_error(tmp_path, capsys):
    assert main(["doctor", *FAST, "--skip", "ffcv,gpux"]) == 2
    err = capsys.readouterr().err
    assert "--skip: unknown gpux" in err and "ffcv, gpu, ray" in err


# -- Ray auth and the job server --------------------------------------------------------------------

def test_token_auth_without_token_fails(bare_home, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    checks = doctor.check_ray(f"127.0.0.1:{closed_port()}", None, 2)
    auth = next(c for c in checks if c.name == "ray auth")
    assert auth.status == "FAIL" and "~/.ray/auth_token" in auth.detail


def test_token_found_in_home_is_named_never_shown(bare_home, monkeypatch):
    (bare_home / ".ray").mkdir()
    (bare_home / ".ray" / "auth_token").write_text("s3cret-token\n")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    checks = doctor.check_ray(f"127.0.0.1:{closed_port()}", None, 2)
    auth = next(c for c in checks if c.name == "ray auth")
    assert auth.status == "OK" and "auth_token" in auth.detail
    assert all("s3cret" not in c.detail + c.fix for c in checks)


def test_an_unreadable_token_path_fails_as_submit_would_refuse_it(bare_home, monkeypatch):
    """doctor and `sslray submit` read the token one way: a RAY_AUTH_TOKEN_PATH that cannot be read is not
    passed over for ~/.ray/auth_token (submit refuses it)."""
    (bare_home / ".ray").mkdir()
    (bare_home / ".ray" / "auth_token").write_text("s3cret-token\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(bare_home / "missing_token"))
    checks = doctor.check_ray(f"127.0.0.1:{closed_port()}", None, 2)
    auth = next(c for c in checks if c.name == "ray auth")
    assert auth.status == "FAIL" and "missing_token cannot be read" in auth.detail


def test_address_auto_asks_this_machines_job_server(monkeypatch):
    asked = []

    def urlopen(req, timeout):
        asked.append(req.full_url)
        raise OSError("refused")

    monkeypatch.setattr(doctor.request, "urlopen", urlopen)
    monkeypatch.setattr(doctor, "tcp_open", lambda *a: None)
    monkeypatch.setattr(doctor.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no ray here")))
    doctor.check_ray("auto", None, 1)
    assert asked == ["http://127.0.0.1:8265/api/version"]


def test_job_server_answering_is_ok():
    with http_server(200, {"ray_version": "2.60.0"}) as url:
        checks = doctor.check_ray(url, None, 2)
    js = next(c for c in checks if c.name == "ray job server")
    assert js.status == "OK" and "2.60.0" in js.detail and url in js.detail
    cluster = next(c for c in checks if c.name == "ray cluster")
    assert cluster.status == "WARN" and "GCS address" in cluster.detail  # a dashboard URL is not for ray.init


def test_job_server_refusing_without_token_fails_with_auth_fix():
    with http_server(401, {"error": "unauthenticated"}) as url:
        checks = doctor.check_ray(url, None, 2)
    js = next(c for c in checks if c.name == "ray job server")
    assert js.status == "FAIL" and "HTTP 401" in js.detail and "RAY_AUTH_TOKEN" in js.fix


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1", ("", "127.0.0.1", 6379)),
    ("10.0.0.5:6380", ("", "10.0.0.5", 6380)),
    ("ray://head:10001", ("ray", "head", 10001)),
    ("http://head", ("http", "head", 8265)),
])
def test_split_address(address, expected):
    assert doctor.split_address(address) == expected


# -- data, timeouts ----------------------------------------------------------------------------------

def fake_beton(tmp_path, size=4096) -> Path:
    beton = tmp_path / "d.beton"
    beton.write_bytes(b"\0" * size)
    (tmp_path / "d.manifest.json").write_text(json.dumps({"num_images": 3, "classes": ["a"], "beton_bytes": size}))
    return beton


def test_missing_data_fails_and_names_it(tmp_path, capsys):
    rc, out = run(capsys, *FAST, *healthy_args(tmp_path), "--data", str(tmp_path / "nope.beton"))
    assert rc == 1 and "FAIL data" in out and "nope.beton does not exist" in out


def test_disk_against_beton_size(tmp_path, monkeypatch):
    beton = fake_beton(tmp_path)
    [ok] = doctor.check_data(str(beton), str(tmp_path / "runs"))
    assert ok.status == "OK" and "3 images, 1 class, --square crop" in ok.detail and str(beton) in ok.detail
    manifest = tmp_path / "d.manifest.json"  # a padded conversion says so (its whole images have grey borders)
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "write_params": {"square": "pad"}}))
    assert "--square pad" in doctor.check_data(str(beton), str(tmp_path / "runs"))[0].detail
    folder = tmp_path / "imgs" / "cat"  # an ImageFolder has no conversion settings to show
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "a.jpg")
    [plain] = doctor.check_data(str(folder.parent), str(tmp_path / "runs"))
    assert "1 images, 1 class," in plain.detail and "--square" not in plain.detail
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    [full] = doctor.check_data(str(beton), str(tmp_path / "runs"))
    assert full.status == "FAIL" and "free" in full.fix


def test_timed_never_hangs():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        doctor.timed(lambda: time.sleep(3), 0.2)
    assert time.monotonic() - t0 < 1
    assert doctor.timed(lambda: 7, 1) == 7


# -- real probes --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_run_with_existing_sqlite_store(tmp_path, capsys):
    """Everything, including the ffcv JPEG round trip and a probe experiment in a real sqlite store."""
    from sslray.tracking import Tracker, _client

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker.start(uri, "existing", "r").end()
    rc, out = run(capsys, *healthy_args(tmp_path), "--data", str(fake_beton(tmp_path)))
    assert rc == 0, out
    assert "decoded 2 JPEGs" in out and "created, wrote and deleted a probe experiment" in out
    live = [e.name for e in _client(uri).search_experiments()]
    assert not any(n.startswith("sslray-doctor-") for n in live)  # the probe is deleted


@pytest.mark.slow
def test_http_server_that_is_not_mlflow_fails(tmp_path):
    with http_server(404, {"error": "not here"}) as url:
        [c] = doctor.check_mlflow(url, 3)
    assert c.status == "FAIL" and url in c.detail


@pytest.mark.ray
def test_reachable_ray_cluster_reports_resources(ray_cluster):
    address = ray_cluster.get_runtime_context().gcs_address
    checks = doctor.check_ray(address, None, 20)
    cluster = next(c for c in checks if c.name == "ray cluster")
    assert cluster.status == "OK", cluster.detail
    assert "CPU" in cluster.detail and address in cluster.detail


# -- a killed `ray start` head: its ray_current_cluster file outlives it ---------------------------

def write_cluster_file(tmp: Path, address: str) -> Path:
    f = tmp / "ray" / "ray_current_cluster"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(address)
    return f


def test_no_cluster_file_means_a_local_instance(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert rayhead.local_head() is None
    rc, out = run(capsys, *FAST, *healthy_args(tmp_path))
    assert rc == 0 and "starts a local Ray" in out


def test_stale_cluster_file_is_named_with_its_fix_and_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    address = f"127.0.0.1:{closed_port()}"
    f = write_cluster_file(tmp_path, address)
    head = rayhead.local_head()
    assert head.file == str(f) and head.address == address and head.dead
    t0 = time.monotonic()
    rc, out = run(capsys, *FAST, *healthy_args(tmp_path))
    assert time.monotonic() - t0 < 5
    assert rc == 0  # no address given: ray is not a need, and sslray itself goes on with a local instance
    line = next(x for x in out.splitlines() if x.startswith("WARN ray cluster"))
    assert str(f) in line and address in line and "fix: ray stop" in line
    assert f.read_text() == address  # the file is Ray's: reported, never removed


def test_garbage_in_cluster_file_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    write_cluster_file(tmp_path, "not-an-address")
    head = rayhead.local_head()
    assert head.dead and "not-an-address" in head.dead


@pytest.mark.ray
def test_live_cluster_file_is_the_cluster_checked(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    address = ray_cluster.get_runtime_context().gcs_address
    f = write_cluster_file(tmp_path, address)
    checks = doctor.check_local_ray(SimpleNamespace(timeout=20, dashboard=None))
    cluster = next(c for c in checks if c.name == "ray cluster")
    assert cluster.status == "OK", cluster.detail
    assert address in cluster.detail and str(f) in cluster.detail and "CPU" in cluster.detail


@pytest.mark.ray
def test_pretrain_starts_a_local_ray_instead_of_waiting_on_a_dead_head(tmp_path):
    """The real failure: before this, a plain ray.init() here waited on the dead GCS with no message."""
    import subprocess
    import sys
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must stay under 107 chars
    address = f"127.0.0.1:{closed_port()}"
    write_cluster_file(short, address)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(short)}
    code = ("import ray; from sslray.raytrain.trainer import ensure_ray; ensure_ray(); "
            "print('CPUS', ray.cluster_resources().get('CPU')); ray.shutdown()")
    try:
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    finally:
        subprocess.run(["rm", "-rf", str(short)], check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "CPUS" in p.stdout
    assert "WARNING" in p.stdout and address in p.stdout and "ray stop" in p.stdout


@pytest.mark.parametrize("where,watcher", [
    ("own instance", "0"),       # nothing else on this machine: Ray starts for this process alone
    ("dead head file", "0"),     # a stale head file: a local instance all the same
    ("live head", None),         # `ray start` on this machine: it may be one node of a drained cluster
    ("RAY_ADDRESS", None),       # a cluster (ray job submit sets it): the watcher stays
    ("asked for", "1"),          # the user's own setting wins
])
def test_only_a_ray_of_its_own_runs_without_the_preemption_watcher(monkeypatch, tmp_path, where, watcher):
    import ray

    from sslray.raytrain import trainer

    inits = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **k: inits.append(address))
    monkeypatch.delenv(trainer.PREEMPTION_WATCHER_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    head = None
    if where == "dead head file":
        head = rayhead.LocalHead(str(tmp_path / "ray_current_cluster"), "127.0.0.1:1", "connection refused")
    elif where == "live head":
        head = rayhead.LocalHead(str(tmp_path / "ray_current_cluster"), "127.0.0.1:6379", None)
    elif where == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    elif where == "asked for":
        monkeypatch.setenv(trainer.PREEMPTION_WATCHER_ENV, "1")
    monkeypatch.setattr(trainer, "local_head", lambda: head)
    monkeypatch.setattr(trainer, "_OWN_INSTANCE", [False])
    trainer.ensure_ray()
    assert os.environ.get(trainer.PREEMPTION_WATCHER_ENV) == watcher
    assert inits == [{"dead head file": "local", "RAY_ADDRESS": "10.0.0.1:6379"}.get(where)]
    assert trainer._OWN_INSTANCE[0] == (where in ("own instance", "dead head file", "asked for"))


def test_gpu_auto_warns_when_a_cluster_has_no_gpu_yet(monkeypatch, capsys):
    """An autoscaling cluster's GPU nodes start at zero: "auto" then trains on CPU, and says so."""
    import ray

    from sslray.config import load_config
    from sslray.raytrain import trainer

    cfg = load_config("smoke", ["ray.use_gpu=auto"])
    resources = {"CPU": 8.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    for own, warned in ((True, False), (False, True)):
        monkeypatch.setattr(trainer, "_OWN_INSTANCE", [own])
        assert trainer.resolve_use_gpu(cfg) is False
        assert ("found no GPU in the cluster" in capsys.readouterr().out) == warned
    resources["GPU"] = 4.0
    assert trainer.resolve_use_gpu(cfg) is True and not capsys.readouterr().out


def test_object_storage_is_probed_by_writing_to_it(s3_server):
    """`--storage s3://...`: a bucket that takes a file is OK, one that does not exist fails naming it
    and pointing to the bucket name and credentials (a local S3 stands in for AWS)."""
    root = s3_server.bucket("doctor")
    [ok] = doctor.check_storage(f"{root}/runs", 5)
    assert ok.status == "OK" and f"{root}/runs: wrote and deleted a probe file" in ok.detail
    import pyarrow.fs as pafs

    from sslray.storage import filesystem

    fs, path = filesystem(root)
    assert not [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if ".sslray-doctor" in i.path]
    [bad] = doctor.check_storage("s3://no-such-bucket-sslray/runs", 5)
    assert bad.status == "FAIL" and "s3://no-such-bucket-sslray/runs is not writable" in bad.detail
    assert "credentials" in bad.fix
