"""`sslray submit` against a real local Ray head with the job server, end to end.

The e2e test starts its own head (`ray start --head --block`, its own ports and temp dir), sends
`sslray pretrain` on a real CIFAR-10 subset from another process, polls the job to SUCCEEDED and
reads the run back from MLflow. The head is ended through the `ray start --block` process it
started, never with a bare `ray stop`, which would also stop other Ray instances of this user.
The helpers (address, token, warnings) are tested in the fast tier.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import drop_ray_lines
from sslray import submit

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
LOCAL_ENV = "cluster/runtime_env.local.yaml"


# ----------------------------------------------------------------------------- fast tier

def test_address_resolution_prefers_flag_then_api_server_then_http_ray_address():
    assert submit.resolve_address("10.0.0.1:8265", {}) == "http://10.0.0.1:8265"
    assert submit.resolve_address(None, {"RAY_API_SERVER_ADDRESS": "http://h:8265/"}) == "http://h:8265"
    assert submit.resolve_address(None, {"RAY_ADDRESS": "http://h:8265"}) == "http://h:8265"
    # A GCS address (what `ray start` prints) is not the job server: fall back to the local one.
    assert submit.resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == submit.DEFAULT_ADDRESS


def test_token_follows_rays_lookup_order(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    token_file = tmp_path / "tok"
    token_file.write_text("from-path")
    home = {"HOME": str(tmp_path)}
    assert submit.auth_headers(home) == {"Authorization": "Bearer from-home"}
    assert submit.auth_headers({**home, "RAY_AUTH_TOKEN_PATH": str(token_file)}) == {
        "Authorization": "Bearer from-path"}
    assert submit.auth_headers({**home, "RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(token_file)}) == {
        "Authorization": "Bearer from-env"}
    assert submit.auth_headers({**home, "RAY_AUTH_MODE": "disabled"}) == {}


def test_token_mode_without_a_token_names_the_fix(tmp_path):
    assert submit.auth_headers({"HOME": str(tmp_path)}) == {}  # mode unset, no token: plain request
    with pytest.raises(submit.SubmitError, match="RAY_AUTH_TOKEN"):
        submit.auth_headers({"HOME": str(tmp_path), "RAY_AUTH_MODE": "token"})
    with pytest.raises(submit.SubmitError, match="empty"):
        (tmp_path / "empty").write_text("")
        submit.auth_headers({"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")})


def test_entrypoint_warnings_flag_results_left_in_the_job_working_dir():
    renv = {"env_vars": {}}
    bare = ["sslray", "pretrain", "--recipe", "smoke", "--data", "data/train.beton", "--val", "/mnt/v.beton"]
    notes = " | ".join(submit.check_entrypoint(bare, renv))
    assert "--storage" in notes and "--tracking-uri" in notes and "--data data/train.beton is relative" in notes
    assert "--val" not in notes
    full = bare[:5] + ["/mnt/t.beton", "--val", "/mnt/v.beton", "--storage", "s3://b/runs",
                       "--tracking-uri=http://head:5000"]
    assert submit.check_entrypoint(full, renv) == []
    assert submit.check_entrypoint(["python", "train.py"], renv) == []
    # relative storage and sqlite files are lost with the job's working dir; overrides count like flags
    rel = bare[:5] + ["/mnt/t.beton", "--storage", "runs", "--tracking-uri", "sqlite:///mlflow.db"]
    notes = " | ".join(submit.check_entrypoint(rel, renv))
    assert "--storage runs is relative" in notes and "sqlite:///mlflow.db is a relative sqlite file" in notes
    over = ["python3", "-m", "sslray.cli", "study", "--methods", "simclr", "ray.storage=s3://b/runs",
            "data.train=/mnt/t.beton", "--tracking-uri", "sqlite:////mnt/m.db"]
    assert submit.check_entrypoint(over, renv) == []
    assert "--storage runs is relative" in " ".join(submit.check_entrypoint(
        [*full, "--storage", "runs"], renv))  # argparse keeps the last --storage


def test_a_failed_job_shows_rays_reason_and_a_refused_token_is_an_error_line(monkeypatch, capsys):
    from types import SimpleNamespace

    from ray.exceptions import AuthenticationError

    fake = SimpleNamespace(get_job_info=lambda job_id: SimpleNamespace(
        message="runtime env setup failed: pip install exited 1"))
    assert submit._finished(fake, "raysubmit_1", "FAILED") == 1
    captured = capsys.readouterr()
    assert "job raysubmit_1 FAILED" in captured.out and "reason: runtime env setup failed" in captured.err

    def refused(a):
        raise AuthenticationError("401 Unauthorized")

    monkeypatch.setattr(submit, "cmd_submit", refused)
    assert submit._run(SimpleNamespace()) == 1
    assert "sslray submit: error: the job server refused the request: 401" in capsys.readouterr().err


class _Job:
    """A job server stand-in: a log that grows by one chunk per status call, a stream of the same
    chunks that may break after ``breaks_after`` of them."""

    def __init__(self, chunks: list[str], breaks_after: int | None = None):
        self.chunks, self.breaks_after, self.calls, self.log_fetches = chunks, breaks_after, 0, 0

    def get_job_status(self, job_id):
        self.calls += 1
        return "SUCCEEDED" if self.calls >= len(self.chunks) else "RUNNING"

    def get_job_logs(self, job_id):
        self.log_fetches += 1
        return "".join(self.chunks[: self.calls])

    async def tail_job_logs(self, job_id):
        for i, chunk in enumerate(self.chunks):
            if i == self.breaks_after:
                raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")
            yield chunk


def test_following_a_job_prints_its_log_once_from_the_stream_or_where_the_stream_broke(capsys):
    chunks = ["epoch 1\n", "epoch 2\n", "epoch 3\n", "done\n"]
    job = _Job(chunks)
    assert submit.wait(job, "j", poll=0) == "SUCCEEDED"
    assert drop_ray_lines(capsys.readouterr().out) == "".join(chunks)
    assert job.log_fetches == 0  # the whole log is never fetched again while following

    broken = _Job(chunks, breaks_after=2)
    assert submit.wait(broken, "j", poll=0) == "SUCCEEDED"
    assert drop_ray_lines(capsys.readouterr().out) == "".join(chunks)  # nothing printed twice, nothing lost
    assert broken.log_fetches >= 1


def test_runtime_env_must_upload_the_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    renv = submit.load_runtime_env(LOCAL_ENV, env_vars=["MLFLOW_TRACKING_URI=http://h:5000"])
    assert renv["working_dir"] == str(REPO) and ".venv" in renv["excludes"]
    assert renv["env_vars"]["MLFLOW_TRACKING_URI"] == "http://h:5000"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(submit.SubmitError, match="repository root"):
        submit.load_runtime_env(str(REPO / LOCAL_ENV))
    with pytest.raises(submit.SubmitError, match="KEY=VALUE"):
        submit.load_runtime_env(None, env_vars=["NOEQUALS"])
    # the cloud env's requirements file is found from the working dir, whatever the cwd
    renv = submit.load_runtime_env(str(REPO / "cluster" / "runtime_env.yaml"), working_dir=str(REPO))
    assert renv["pip"] == str(REPO / "cluster" / "requirements.txt")
    (tmp_path / "env.yaml").write_text("pip: nope/requirements.txt\n")
    with pytest.raises(submit.SubmitError, match="pip: nope/requirements.txt is not a file"):
        submit.load_runtime_env(str(tmp_path / "env.yaml"), working_dir=str(REPO))


def test_cli_reports_an_unreachable_job_server():
    out = subprocess.run([sys.executable, "-m", "sslray.cli", "submit", "--address", f"127.0.0.1:{_free_port()}",
                          "status", "raysubmit_x"], cwd=REPO, check=False, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 1 and "sslray submit: error" in out.stderr


# ----------------------------------------------------------------------------- local head

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalHead:
    """A Ray head with the job server, owned by this test: own ports, own temp dir."""

    def __init__(self, auth_env: dict[str, str]):
        self.dash = _free_port()
        self.url = f"http://127.0.0.1:{self.dash}"
        self.temp = tempfile.mkdtemp(prefix="sslray-ray-", dir="/tmp")  # short: unix socket paths
        self.env = {**os.environ, **auth_env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
                    # On SIGTERM a head drains for up to 30 s first (for Serve replicas); this one
                    # serves nothing once its test is over, so it stops at once.
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.env.pop("RAY_ADDRESS", None)
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
               f"--port={_free_port()}", f"--dashboard-port={self.dash}", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", f"--dashboard-agent-listen-port={_free_port()}",
               f"--ray-client-server-port={_free_port()}", "--object-store-memory=300000000",
               f"--temp-dir={self.temp}", "--disable-usage-stats"]
        self.log = open(Path(self.temp) / "ray-start.log", "w")  # noqa: SIM115 - lives as long as the head
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 180.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.start_log()}")
            try:
                # The job API answers only once the job server module is up.
                req = urllib.request.Request(f"{self.url}/api/version", headers=submit.auth_headers(self.env))
                with urllib.request.urlopen(req, timeout=3) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"job server at {self.url} not up after {timeout:.0f} s:\n{self.start_log()}")

    def start_log(self) -> str:
        return (Path(self.temp) / "ray-start.log").read_text()[-4000:]

    def stop(self) -> None:
        """SIGTERM to our `ray start --block`: it ends the processes it started, and only those."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)


def _sslray(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sslray.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _poll(client, job_id: str, until: tuple[str, ...], timeout: float) -> str:
    t0 = time.monotonic()
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in until or status in submit.TERMINAL:
            return status
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s:\n{client.get_job_logs(job_id)[-6000:]}")
        time.sleep(2)


@pytest.fixture
def local_head():
    pytest.importorskip("ray.job_submission")
    head = LocalHead({"RAY_AUTH_MODE": "disabled"})
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_submit_pretrain_end_to_end(local_head, cifar_small, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    job_id = f"sslray-e2e-{secrets.token_hex(4)}"
    t0 = time.monotonic()
    out = _sslray("submit", "--address", local_head.url, "--runtime-env", LOCAL_ENV, "--submission-id", job_id,
                  "--no-wait", "--", "sslray", "pretrain", "--recipe", "smoke", "--data", cifar_small["train"],
                  "--val", cifar_small["test"], "--workers", "2", "--storage", str(tmp_path / "runs"),
                  "--tracking-uri", uri, "--experiment", "e2e",
                  "--no-probe",  # the end-of-run probe is the e2e pretrain tests' subject; ~20 s here
                  env=local_head.env)
    assert out.returncode == 0, out.stderr
    assert f"job {job_id} submitted" in out.stdout

    client = JobSubmissionClient(local_head.url)
    status = _poll(client, job_id, until=("SUCCEEDED",), timeout=1200)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-6000:]
    print(f"e2e job {job_id}: SUCCEEDED in {time.monotonic() - t0:.0f} s")

    assert "sslray: run" in logs, logs[-6000:]

    exps = MlflowClient(tracking_uri=uri).search_experiments(filter_string="name = 'e2e'")
    assert len(exps) == 1
    found = MlflowClient(tracking_uri=uri).search_runs([exps[0].experiment_id])
    assert len(found) == 1
    run = found[0]
    assert run.info.status == "FINISHED"
    assert "knn_top1" in run.data.metrics and 0.0 <= run.data.metrics["knn_top1"] <= 1.0
    assert Path(run.data.tags["sslray.checkpoint"]).is_relative_to(tmp_path / "runs")

    st = _sslray("submit", "status", job_id, "--address", local_head.url, env=local_head.env)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout, st.stderr
    lg = _sslray("submit", "--address", local_head.url, "logs", job_id, env=local_head.env)
    assert lg.returncode == 0 and "sslray: run" in lg.stdout

    # stop: a long job is ended on request.
    sleeper = _sslray("submit", "--address", local_head.url, "--runtime-env", "", "--no-wait", "--",
                      "python", "-c", "import time; time.sleep(300)", env=local_head.env)
    assert sleeper.returncode == 0, sleeper.stderr
    sleeper_id = sleeper.stdout.split("job ", 1)[1].split()[0]
    assert _poll(client, sleeper_id, until=("RUNNING",), timeout=120) == "RUNNING"
    stop = _sslray("submit", "stop", sleeper_id, "--address", local_head.url, env=local_head.env)
    assert stop.returncode == 0 and "stop requested" in stop.stdout
    assert _poll(client, sleeper_id, until=("STOPPED",), timeout=120) == "STOPPED"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submit_to_a_token_auth_head():
    """Ray's default for `ray start --head`: token auth. sslray submit sends the token (here from
    RAY_AUTH_TOKEN, so ~/.ray/auth_token is left alone), the job's driver joins the cluster with
    it, and a client without the token is refused with a message that names the fix."""
    pytest.importorskip("ray.job_submission")
    token = secrets.token_hex(16)
    head = LocalHead({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    try:
        head.wait_ready()
        client_env = {k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"}
        out = _sslray("submit", "--address", head.url, "--runtime-env", "", "--", "python", "-c",
                      "import ray; ray.init(); print('cpus', ray.cluster_resources()['CPU'])", env=client_env)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "cpus 2.0" in out.stdout and "SUCCEEDED" in out.stdout

        no_token = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN"}
        refused = _sslray("submit", "list", "--address", head.url, env={**no_token, "RAY_AUTH_MODE": "disabled"})
        assert refused.returncode == 1 and "uthentication" in refused.stderr, refused.stderr
        wrong = _sslray("submit", "list", "--address", head.url, env={**no_token, "RAY_AUTH_TOKEN": "wrong"})
        assert wrong.returncode == 1 and "uthentication" in wrong.stderr, wrong.stderr
        for out in (refused, wrong):  # the error line, not a traceback that also mentions it
            assert "sslray submit: error: the job server refused" in out.stderr and "Traceback" not in out.stderr
    finally:
        head.stop()
