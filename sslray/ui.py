"""`sslray ui`: the MLflow UI on sslray's store (a thin wrapper over ``mlflow ui --backend-store-uri``)."""

from __future__ import annotations

import os
import subprocess
import sys
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


def cmd_ui(a) -> int:
    cmd = ui_command(a.tracking_uri, a.host, a.port, a.workers)
    url = ui_url(a.host, a.port)
    if a.experiment:  # MLflow 3 opens an experiment on its GenAI overview: link its runs table instead
        url += f"/#/experiments/{experiment_id(a.tracking_uri, a.experiment)}/runs"
    print(f"sslray ui: MLflow UI on {resolve_uri(a.tracking_uri)} at {url} (Ctrl-C stops it)", flush=True)
    # MLflow 3's server also starts a GenAI job runner (eight huey consumer processes); sslray's runs
    # never use it, and on a small machine it slows the UI's start a lot. Set the variable to override.
    env = {**os.environ}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


def register(sub) -> None:
    u = sub.add_parser("ui", help="open the MLflow UI on the project's store (runs, curves, probe metrics)")
    u.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    u.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network)")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--workers", type=int, default=1, help="server processes (default 1; mlflow's own default is 4)")
    u.add_argument("--experiment", help="print a link straight to this experiment's runs table")
    u.set_defaults(func=cmd_ui)
