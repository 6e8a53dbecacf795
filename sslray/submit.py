"""`sslray submit`: send a command to a Ray cluster as a Ray job, and manage it.

A thin layer over the Ray Job Submission SDK, equivalent to::

    ray job submit --address ADDR --working-dir . --runtime-env cluster/runtime_env.yaml -- CMD...

    sslray submit [--address ADDR] [--runtime-env FILE] [--no-wait] -- sslray pretrain ...
    sslray submit status|logs|stop JOB_ID [--address ADDR]
    sslray submit list [--address ADDR]

What it adds over the plain CLI: the token of Ray's token authentication (Ray >= 2.52) is sent
without having to export ``RAY_AUTH_MODE=token`` first; the working dir is checked to be the
sslray repository; and a job that would write its checkpoints or MLflow runs into its own
temporary working dir (lost when the job ends) is flagged before it is sent.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_RUNTIME_ENV = "cluster/runtime_env.yaml"
VERBS = ("status", "logs", "stop", "list")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ValueError):
    """A submission that cannot be sent as asked; the message says what to change."""


def resolve_address(address: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """``--address`` > ``$RAY_API_SERVER_ADDRESS`` > ``$RAY_ADDRESS`` (when it is an http URL) > local.

    The job server is the dashboard's HTTP port (8265), not the GCS port (6379) of ``ray start``."""
    addr = address or env.get("RAY_API_SERVER_ADDRESS")
    if not addr:
        ray_addr = env.get("RAY_ADDRESS", "")
        addr = ray_addr if ray_addr.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    if "://" not in addr:
        addr = "http://" + addr
    return addr.rstrip("/")


def find_token(env: Mapping[str, str] = os.environ) -> tuple[str | None, str]:
    """``(token, where it was looked for)``, in Ray's own order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token. A RAY_AUTH_TOKEN_PATH that cannot be read, or is empty, raises."""
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        p = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = p.read_text().strip()
        except OSError as e:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={p} cannot be read: {e.strerror}") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={p} is empty")
        return token, str(p)
    default = Path(env.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
    token = default.read_text().strip() if default.is_file() else ""
    return token or None, str(default)


def read_token(env: Mapping[str, str] = os.environ) -> str | None:
    """The Ray auth token (``find_token``), or None."""
    return find_token(env)[0]


def auth_headers(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``Authorization: Bearer <token>`` for the job server, as Ray's CLI would send it.

    ``RAY_AUTH_MODE=disabled`` sends nothing; ``=token`` requires a token; unset sends the token
    when one exists (what ``ray job submit`` does since Ray 2.52). A server with auth disabled
    ignores the header."""
    mode = env.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    token = read_token(env)
    if token:
        return {"Authorization": f"Bearer {token}"}
    if mode == "token":
        raise SubmitError("RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, "
                          "or copy the head's ~/.ray/auth_token (`ray get-auth-token` on the head prints it)")
    return {}


def load_runtime_env(path: str | None, working_dir: str | None = None,
                     env_vars: Sequence[str] = ()) -> dict:
    """The runtime env YAML (paths in it are relative to the cwd, as for ``ray job submit``),
    with ``--working-dir`` and ``--env KEY=VALUE`` applied."""
    renv: dict = {}
    if path:
        try:
            renv = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise SubmitError(f"runtime env {path}: {e.strerror} (submit from the repository root)") from None
        if not isinstance(renv, dict):
            raise SubmitError(f"runtime env {path} must hold a mapping")
    if working_dir:
        renv["working_dir"] = working_dir
    for item in env_vars:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {item!r} must look like KEY=VALUE")
        renv.setdefault("env_vars", {})[key] = value
    wd = renv.get("working_dir")
    if wd and "://" not in str(wd):
        wd_path = Path(wd).expanduser().resolve()
        if not (wd_path / "sslray" / "cli.py").is_file():
            raise SubmitError(f"working_dir {wd!r} is {wd_path}, which holds no sslray/ package: "
                              "run `sslray submit` from the repository root, or pass --working-dir")
        renv["working_dir"] = str(wd_path)
    pip = renv.get("pip")
    if isinstance(pip, str) and not Path(pip).expanduser().is_absolute():
        # A requirements file named in the YAML: relative to the working dir (the repository) rather than
        # wherever the command runs, and checked here, not after the working dir was uploaded.
        base = Path(renv["working_dir"]) if wd and "://" not in str(wd) else Path.cwd()
        req = (base / pip).resolve()
        if not req.is_file():
            raise SubmitError(f"runtime env pip: {pip} is not a file (looked for {req})")
        renv["pip"] = str(req)
    return renv


def _flag(argv: Sequence[str], name: str) -> str | None:
    """The value of ``name`` in ``argv`` (``--x v`` or ``--x=v``); the last one, as argparse keeps it."""
    found = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith(name + "="):
            found = a.split("=", 1)[1]
    return found


def _override(argv: Sequence[str], key: str) -> str | None:
    """The value of a ``section.key=value`` override in ``argv`` (the last one)."""
    found = None
    for a in argv:
        if a.startswith(key + "="):
            found = a.split("=", 1)[1]
    return found


def check_entrypoint(argv: Sequence[str], runtime_env: Mapping) -> list[str]:
    """Warnings for an sslray run whose results would stay in the job's temporary working dir."""
    python = len(argv) >= 3 and Path(argv[0]).name.startswith("python") and list(argv[1:3]) == ["-m", "sslray.cli"]
    if len(argv) < 2 or (Path(argv[0]).name != "sslray" and not python):
        return []
    if not {"pretrain", "tune", "study"} & set(argv):
        return []
    notes = []
    storage = _flag(argv, "--storage") or _override(argv, "ray.storage")
    if storage is None:
        notes.append("no --storage: checkpoints go to ./runs inside the job's temporary working dir; "
                     "pass --storage s3://..., gs://... or a shared mount")
    elif "://" not in storage and not os.path.isabs(os.path.expanduser(storage)):
        notes.append(f"--storage {storage} is relative: checkpoints go inside the job's temporary working dir and "
                     "are lost with it; give s3://..., gs://... or an absolute path on a shared mount")
    uri = _flag(argv, "--tracking-uri") or _override(argv, "tracking.tracking_uri")
    if uri is None and "MLFLOW_TRACKING_URI" not in runtime_env.get("env_vars", {}):
        notes.append("no --tracking-uri: the job logs to the cluster's $MLFLOW_TRACKING_URI (set by cluster/*.yaml), "
                     "else to sqlite:///mlflow.db inside its temporary working dir")
    elif uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        notes.append(f"--tracking-uri {uri} is a relative sqlite file: it is written inside the job's temporary "
                     "working dir and lost with it; give an absolute path (sqlite:////shared/mlflow.db) or a server")
    for name, key in (("--data", "data.train"), ("--val", "data.val")):
        value = _flag(argv, name) or _override(argv, key)
        if value and "://" not in value and not os.path.isabs(os.path.expanduser(value)):
            notes.append(f"{name} {value} is relative: it resolves inside the uploaded working dir, where data "
                         "is excluded; give an absolute path on storage every node mounts")
    return notes


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=auth_headers())


def wait(c, job_id: str, timeout: float = 0.0, poll: float = 2.0, follow: bool = True) -> str:
    """Print the job's log as it grows until the job reaches a terminal state; return that state.

    The log comes through Ray's log stream (one websocket, each line sent once). Where the stream
    breaks (a proxy without websockets, a dropped connection, a caller already inside an event loop),
    the log is polled every ``poll`` seconds from the first character not yet printed."""
    t0 = time.monotonic()
    printed, streamed = _stream(c, job_id, timeout) if follow else (0, True)
    while True:
        status = c.get_job_status(job_id)
        status = str(getattr(status, "value", status))
        if not streamed:
            logs = c.get_job_logs(job_id)
            if len(logs) > printed:
                sys.stdout.write(logs[printed:])
                sys.stdout.flush()
                printed = len(logs)
        if status in TERMINAL:
            return status
        if timeout and time.monotonic() - t0 > timeout:
            raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(poll)


def _stream(c, job_id: str, timeout: float) -> tuple[int, bool]:
    """Follow the job's log stream to its end: (characters printed, whether the stream ended normally)."""
    import asyncio

    printed = 0

    async def follow():
        nonlocal printed
        async for chunk in c.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            printed += len(chunk)

    try:
        asyncio.run(asyncio.wait_for(follow(), timeout or None))
    except TimeoutError:
        raise TimeoutError(f"job {job_id} still running after {timeout:.0f} s") from None
    except Exception:  # noqa: BLE001 - any broken stream: polling picks up where it stopped (and fails
        return printed, False  # with the job server's own error if the server itself is the trouble)
    return printed, True


def cmd_submit(a) -> int:
    rest = list(a.rest)
    if rest and rest[0] in VERBS:
        return cmd_manage(rest[0], rest[1:], a)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if not rest:
        raise SubmitError("nothing to run: sslray submit [options] -- sslray pretrain ...")
    renv = load_runtime_env(a.runtime_env, a.working_dir, a.env)
    for note in check_entrypoint(rest, renv):
        print(f"sslray submit: warning: {note}", file=sys.stderr)
    address = resolve_address(a.address)
    c = client(address)
    entrypoint = shlex.join(rest)
    job_id = c.submit_job(entrypoint=entrypoint, runtime_env=renv, submission_id=a.submission_id,
                          entrypoint_num_cpus=a.entrypoint_num_cpus or None,
                          entrypoint_num_gpus=a.entrypoint_num_gpus or None)
    print(f"sslray submit: job {job_id} submitted to {address}: {entrypoint}")
    print(f"  status: sslray submit status {job_id} --address {address}")
    print(f"  logs:   sslray submit logs {job_id} --address {address}")
    print(f"  stop:   sslray submit stop {job_id} --address {address}")
    sys.stdout.flush()
    if a.no_wait:
        return 0
    try:
        status = wait(c, job_id)
    except KeyboardInterrupt:
        print(f"\nsslray submit: stopped following; job {job_id} keeps running "
              f"(sslray submit stop {job_id} to end it)", file=sys.stderr)
        return 130
    return _finished(c, job_id, status)


def _finished(c, job_id: str, status: str) -> int:
    """The job's end line; for a job that did not succeed, Ray's reason too (a job that failed in its
    runtime env set-up, before its command started, has no log to show)."""
    print(f"sslray submit: job {job_id} {status}")
    if status != "SUCCEEDED":
        message = getattr(c.get_job_info(job_id), "message", "") or ""
        if message.strip():
            print(f"sslray submit: reason: {message.strip()}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_manage(verb: str, argv: Sequence[str], outer) -> int:
    p = argparse.ArgumentParser(prog=f"sslray submit {verb}")
    if verb != "list":
        p.add_argument("job_id")
    p.add_argument("--address", default=outer.address)
    if verb == "logs":
        p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    a = p.parse_args(list(argv))
    address = resolve_address(a.address)
    c = client(address)
    if verb == "list":
        for job in sorted(c.list_jobs(), key=lambda j: j.start_time or 0):
            print(f"{job.submission_id or job.job_id}\t{job.status}\t{job.entrypoint}")
        return 0
    if verb == "status":
        info = c.get_job_info(a.job_id)
        print(f"{a.job_id}\t{info.status}\t{info.message or ''}".rstrip())
        return 0
    if verb == "logs":
        if a.follow:
            return _finished(c, a.job_id, wait(c, a.job_id))
        sys.stdout.write(c.get_job_logs(a.job_id))
        return 0
    stopped = c.stop_job(a.job_id)
    print(f"sslray submit: job {a.job_id} " + ("stop requested" if stopped else "was not running"))
    return 0


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "submit", help="run a command on a Ray cluster as a Ray job (status|logs|stop|list JOB_ID to manage)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--address", help=f"job server URL (default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, {DEFAULT_ADDRESS})")
    s.add_argument("--runtime-env", default=DEFAULT_RUNTIME_ENV,
                   help="runtime env YAML (default cluster/runtime_env.yaml; cluster/runtime_env.local.yaml "
                        "for machines that share one installed venv)")
    s.add_argument("--working-dir", help="override the runtime env's working_dir")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job, e.g. MLFLOW_TRACKING_URI=http://head:5000 (repeatable)")
    s.add_argument("--submission-id", help="job id to use (default: generated)")
    s.add_argument("--entrypoint-num-cpus", type=float, default=0, help="CPUs reserved for the driver command")
    s.add_argument("--entrypoint-num-gpus", type=float, default=0, help="GPUs reserved for the driver command")
    s.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    s.add_argument("rest", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the command to run on the cluster, or: status|logs|stop|list JOB_ID")
    s.set_defaults(func=_run)


def _run(a) -> int:
    try:
        return cmd_submit(a)
    except SubmitError as e:
        print(f"sslray submit: error: {e}", file=sys.stderr)
        return 2
    except (ConnectionError, RuntimeError) as e:
        # The SDK raises these for an unreachable job server and unknown job ids.
        print(f"sslray submit: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from ray.exceptions import AuthenticationError

        if not isinstance(e, AuthenticationError):  # a 401/403 from the job server: the token
            raise
        print(f"sslray submit: error: the job server refused the request: {e}", file=sys.stderr)
        return 1
