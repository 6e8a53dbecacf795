"""`sslray ui` stops its server when it is stopped, and refuses a busy port up front.

The `mlflow ui` server (and its uvicorn process) used to run in sslray's own process group with
`subprocess.call`: a terminal's Ctrl-C reached them all, but a notebook's or IDE's stop (SIGTERM, or
SIGINT to the sslray process alone) ended sslray only, and the server kept the port; the next
`sslray ui` on it printed its URL and then failed with "address already in use" in uvicorn's log."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port now (bound as uvicorn binds: SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _stat(pid: int) -> tuple[int, int, str, int] | None:
    """``(ppid, pgid, state, start time)`` of a process from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[2]), fields[0], int(fields[19])


def _tree(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: pid -> start time (to tell a reused pid from the process)."""
    stats = {int(p): st for p in os.listdir("/proc") if p.isdigit() and (st := _stat(int(p))) is not None}
    out, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, state, start) in stats.items():
            if ppid == parent and pid not in out and state != "Z":
                out[pid] = start
                todo.append(pid)
    return out


def _alive(procs: dict[int, int]) -> list[int]:
    """Those of ``procs`` still running (an exited process not yet reaped, a zombie, holds nothing)."""
    return [pid for pid, start in procs.items()
            if (st := _stat(pid)) is not None and st[3] == start and st[2] != "Z"]


def _kill(procs: dict[int, int]) -> None:
    for pid in _alive(procs):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _until(check, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return check()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@pytest.mark.slow  # starts a real `mlflow ui` (uvicorn): ~10-20 s on 2 busy cores
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopping_sslray_alone_stops_the_server_and_frees_the_port(tmp_path, stop):
    """SIGTERM: forwarded to the server's group. SIGKILL (an IDE's force stop, a kernel restart): sslray
    cannot forward it, and the kernel's parent-death signal stops the server instead."""
    port = _free_port()
    log = tmp_path / "ui.log"
    with open(log, "w") as f:  # a session of its own, like a notebook's Popen: no terminal signal reaches it
        proc = subprocess.Popen([sys.executable, "-m", "sslray.cli", "ui", "--tracking-uri",
                                 f"sqlite:///{tmp_path / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    server: dict[int, int] = {}
    try:
        up = _until(lambda: proc.poll() is not None or _answers(f"http://127.0.0.1:{port}/health"), 180, 0.25)
        assert up and proc.poll() is None, f"`sslray ui` did not serve (exit {proc.poll()}):\n{log.read_text()[-3000:]}"
        server = _tree(proc.pid)  # mlflow ui and its uvicorn
        assert server, "no server process under `sslray ui`"
        assert f"at http://127.0.0.1:{port}" in log.read_text()

        os.kill(proc.pid, stop)  # the sslray process only, not its group
        rc = proc.wait(timeout=30)
        gone = _until(lambda: not _alive(server) and _port_free(port), timeout=15)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for pid in _alive(server)}
        assert gone, f"after {stop.name} to `sslray ui` these server processes remain: {left}; port {port} " \
                     f"free: {_port_free(port)}"
        assert rc == (0 if stop == signal.SIGTERM else -signal.SIGKILL), log.read_text()[-3000:]
    finally:
        _kill(server)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_busy_port_is_a_clear_error_and_no_server_starts(tmp_path, monkeypatch, capsys):
    from sslray.cli import main

    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"a server was started: {a}"))
    with socket.socket() as held:  # a server already listening on the port
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        rc = main(["ui", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port)])
    out, err = capsys.readouterr()
    assert rc != 0 and "http://" not in out, out  # no URL printed for a server that cannot start
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"port {port} on 127.0.0.1 is already in use" in lines[0] and "--port" in lines[0], err
    assert not (tmp_path / "mlflow.db").exists()


# --- the server's process group, with a stand-in for `mlflow ui` (fast: no MLflow) -----------------------

STUBBORN = """
import os, signal, subprocess, sys, time
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)  # a server that does not stop when asked (inherited by its child)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
child.wait()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_request_is_forwarded_to_the_group_and_a_server_that_ignores_it_is_killed(sig, tmp_path):
    """`run_server` in its own process (the signal goes to it alone): the request reaches the whole
    server group, which ignores it, and after the grace period the group is killed and 0 returned."""
    ready = tmp_path / "pids"
    # As started from a terminal: a background job's SIGINT is ignored from its start (and inherited here
    # when the suite runs as one), and run_server rightly leaves an ignored signal so.
    driver = textwrap.dedent(f"""
        import signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from sslray.ui import run_server
        sys.exit(run_server([sys.executable, "-c", {STUBBORN!r}, {str(ready)!r}], {{}}, grace=1.0))
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], start_new_session=True, stderr=subprocess.PIPE)
    pids: dict[int, int] = {}
    try:
        assert _until(lambda: ready.exists() or proc.poll() is not None, 30, 0.05), "the stand-in did not start"
        assert proc.poll() is None, proc.stderr.read().decode()
        for pid in map(int, ready.read_text().split()):
            st = _stat(pid)
            assert st is not None and st[1] != os.getpgid(proc.pid)  # a process group apart from sslray's
            pids[pid] = st[3]
        t0 = time.monotonic()
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=20) == 0, proc.stderr.read().decode()
        assert 0.9 < time.monotonic() - t0 < 15  # waited the grace period, then killed
        assert _until(lambda: not _alive(pids), 5), f"left running: {_alive(pids)}"
    finally:
        _kill(pids)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_the_servers_own_exit_status_is_returned():
    from sslray.ui import run_server

    assert run_server([sys.executable, "-c", "raise SystemExit(3)"], {**os.environ}) == 3
    assert run_server([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                      {**os.environ}) == 128 + signal.SIGKILL
