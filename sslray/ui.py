"""`sslray ui`: the MLflow UI on sslray's store (a thin wrapper over ``mlflow ui --backend-store-uri``)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

from .tracking import artifact_root, experiment_id, resolve_uri


def ui_command(tracking_uri: Optional[str] = None, host: str = "127.0.0.1", port: int = 5000,
               workers: int = 1) -> list[str]:
    """The ``mlflow ui`` command line for the store that ``sslray pretrain`` writes by default.

    One server process by default: a local UI has one user, and on a busy machine uvicorn's supervisor kills
    workers that are slow to import MLflow, so several workers may never come up. The artifact root is the ``mlartifacts/`` folder beside a sqlite file, where sslray's experiments keep
    their artifacts, so a run's PNGs show in the UI whatever folder the UI is started from."""
    uri = resolve_uri(tracking_uri)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", str(workers)]
    root = artifact_root(uri)
    if root:
        cmd += ["--artifacts-destination", root]
    return cmd


def ui_url(host: str, port: int) -> str:
    shown = "localhost" if host in ("0.0.0.0", "::") else host  # where it listens; all interfaces: this host
    if ":" in shown and not shown.startswith("["):  # an IPv6 address goes in brackets in a URL
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def check_port(host: str, port: int) -> None:
    """Raise ``ValueError`` (one line, naming the port and ``--port``) when ``host:port`` is in use, found by
    binding it as the server will (``SO_REUSEADDR``, so closed connections lingering in TIME_WAIT do not
    count). Without this check ``mlflow ui`` started, the URL was printed, and the
    server's "address already in use" was buried in its log. A host that does not resolve is left to
    the server to report."""
    try:
        addrs = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return
    for family, kind, proto, _, addr in dict.fromkeys(addrs):
        with socket.socket(family, kind, proto) as s:
            if os.name != "nt":  # on Windows SO_REUSEADDR would let the probe share a listening port
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                # Only a port in use is refused: another bind error (``localhost`` listing ``::1`` where
                # IPv6 is off) may not concern the address the server binds; it reports its own.
                if e.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", errno.EADDRINUSE)):
                    raise ValueError(f"port {port} on {host} is already in use (another `sslray ui` or server "
                                     f"still running?): stop it, or pick another port with --port") from None


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
KILL = getattr(signal, "SIGKILL", signal.SIGTERM)


class _Stop(Exception):
    """Raised by the signal handler to leave a blocking wait on the server."""


def _signal_server(proc: subprocess.Popen, signum: int) -> None:
    """``signum`` to the server's process group: ``mlflow ui`` and its uvicorn/gunicorn processes."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signum)  # its group id is its pid (started in a session of its own)
        else:  # pragma: no cover - Windows: no process groups to signal
            proc.send_signal(signum)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent():
    """On Linux, a ``preexec_fn`` asking the kernel to send the server SIGTERM when this process dies
    (``prctl(PR_SET_PDEATHSIG)``): in a session of its own, the server would outlive a SIGKILL of
    ``sslray ui`` (an IDE's force stop, a kernel restart) and keep the port. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def arm() -> None:
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    return arm


def _group_alive(pgid: int) -> bool:
    if not hasattr(os, "killpg"):  # pragma: no cover
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _exit_status(rc: int) -> int:
    return 128 - rc if rc < 0 else rc  # killed by signal N: 128 + N, as a shell reports it


def run_server(cmd: list[str], env: dict, grace: float = 5.0) -> int:
    """Run ``cmd`` (the ``mlflow ui`` server) in a session and process group of its own until it exits or
    this process is asked to stop. SIGINT, SIGTERM and SIGHUP received here are forwarded to the whole
    group, so its uvicorn/gunicorn children stop too and free the port; what still runs ``grace`` seconds
    later is killed (SIGKILL). A terminal's Ctrl-C reaches this process and is forwarded like the others;
    a notebook's or IDE's stop (``Popen.terminate()``, a SIGINT or SIGTERM to this process alone) used to
    leave the server running. A signal this process ignores (``nohup``, a background job) is left so.

    Returns 0 when the server was stopped on request, else the server's exit status (128 + N when a
    signal N ended it)."""
    proc: subprocess.Popen | None = None
    asked: list[int] = []
    waiting = [False]  # in the untimed wait, which only an exception from the handler can leave

    def forward(signum, _frame):
        asked.append(signum)
        if proc is not None:
            _signal_server(proc, signum)
        if waiting[0]:
            raise _Stop

    old = {}
    for s in STOP_SIGNALS:
        try:
            if signal.getsignal(s) is not signal.SIG_IGN:
                old[s] = signal.signal(s, forward)
        except ValueError:  # not the main thread: no handlers (the finally clause still stops the server)
            break
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent())
        if asked:  # a request that came while the server was being started
            _signal_server(proc, asked[0])
        deadline, killed = None, False
        while True:
            try:
                if not asked:
                    waiting[0] = True
                    try:
                        if not asked:  # none came since the check above
                            rc = proc.wait()
                            break
                    finally:
                        waiting[0] = False
                    continue
                if deadline is None:
                    deadline = time.monotonic() + grace
                rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                break
            except _Stop:
                continue
            except subprocess.TimeoutExpired:  # the server did not stop in time
                _signal_server(proc, KILL)
                rc, killed = proc.wait(), True
                break
        # mlflow waits for its uvicorn before it exits; any member of its group still there (one it could
        # not wait for) would keep the port: give it the rest of the grace period, then kill it.
        end = time.monotonic() + (1.0 if killed else max(1.0, (deadline or time.monotonic()) - time.monotonic()))
        while _group_alive(proc.pid) and time.monotonic() < end:
            time.sleep(0.05)
        if _group_alive(proc.pid):  # still there, or exited and not yet reaped (a zombie holds no port)
            _signal_server(proc, KILL)
        return 0 if asked else _exit_status(rc)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc is not None and proc.poll() is None:  # an unexpected error above: leave no server behind
            _signal_server(proc, KILL)
            proc.wait()


def cmd_ui(a) -> int:
    check_port(a.host, a.port)  # before anything is printed or started
    cmd = ui_command(a.tracking_uri, a.host, a.port, a.workers)
    url = ui_url(a.host, a.port)
    if a.experiment:  # MLflow 3 opens an experiment on its GenAI overview: link its runs table instead
        url += f"/#/experiments/{experiment_id(a.tracking_uri, a.experiment)}/runs"
    print(f"sslray ui: MLflow UI on {resolve_uri(a.tracking_uri)} at {url} (Ctrl-C stops it)", flush=True)
    # MLflow 3's server also starts a GenAI job runner (eight huey consumer processes); sslray's runs
    # never use it, and on a small machine it slows the UI's start a lot. Set the variable to override.
    env = {**os.environ}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return run_server(cmd, env)


def register(sub) -> None:
    u = sub.add_parser("ui", help="open the MLflow UI on the project's store (runs, curves, probe metrics)")
    u.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    u.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network)")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--workers", type=int, default=1, help="server processes (default 1; mlflow's own default is 4)")
    u.add_argument("--experiment", help="print a link straight to this experiment's runs table")
    u.set_defaults(func=cmd_ui)
