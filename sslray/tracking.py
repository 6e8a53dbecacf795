"""The one place that talks to MLflow.

Everything goes through ``MlflowClient`` with an explicit run id (no global active run), so the
driver, a Ray Train controller callback and a later ``sslray probe`` can all write to the same run,
and a resumed training run keeps its id. Only the driver side writes: sqlite never sees two writers.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

DEFAULT_DB = "mlflow.db"


def resolve_uri(uri: Optional[str] = None) -> str:
    """``--tracking-uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db`` in the cwd.
    Relative sqlite paths become absolute so Ray processes with another cwd write the same file."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif ":" not in uri and uri not in BARE_SCHEMES:  # a plain folder path: MLflow's file store
        uri = str(Path(uri).resolve())
    return uri


# Tracking URIs MLflow takes without "://" (a workspace's default profile); never a folder name.
BARE_SCHEMES = ("databricks", "databricks-uc", "uc")


def folder_name(experiment: str) -> str:
    """``experiment`` as one safe path component: MLflow takes any name (``/Shared/exp``, ``ab#2``), but a
    slash would leave the folder and ``#``/``?`` would cut a file URI short."""
    return re.sub(r"[^\w.-]+", "_", experiment).strip("._") or "experiment"


def artifact_root(uri: str) -> Optional[str]:
    """Artifacts beside a local sqlite file (``mlartifacts/``), not wherever the cwd happens to be."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
    return None


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _client(uri: str):
    import logging

    from mlflow.tracking import MlflowClient

    # Alembic prints every sqlite migration at INFO on first use; it is not news to the user.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def param_text(value: Any) -> str:
    """A param's value as MLflow stores it (text, at most 6,000 characters)."""
    return str(value)[:6000]


class Tracker:
    """A handle on one MLflow run."""

    def __init__(self, uri: str, run_id: str):
        self.uri = resolve_uri(uri)
        self.run_id = run_id
        self._c = None
        self._mirror: Any = None  # the run's TensorBoard mirror (tbmirror), read from its tags on first write
        self._mirror_read = False

    def mirror(self):
        """The run's ``tbmirror.Mirror`` when it has one (tag ``sslray.tensorboard``), else None."""
        if not self._mirror_read:
            from .tbmirror import mirror_of

            self._mirror = mirror_of(self.client.get_run(self.run_id).data.tags)
            self._mirror_read = True
        return self._mirror

    def mirror_to(self, logdir: str) -> None:
        """Mirror this run's logging to TensorBoard events in ``logdir`` from now on (and tag the run so that
        every later writer does too)."""
        from .tbmirror import TB_TAG, Mirror

        self.client.set_tag(self.run_id, TB_TAG, logdir)
        self._mirror, self._mirror_read = Mirror(logdir), True

    def _mirrored(self, what: str, *args) -> None:
        """Mirror one write; a mirror that fails (a full disk) is reported once and dropped: MLflow, the
        record, has what was logged."""
        m = None
        try:
            m = self.mirror()
            if m is not None:
                getattr(m, what)(*args)
        except Exception as e:  # noqa: BLE001 - the MLflow write it mirrors has been made
            where = f" in {m.logdir}" if m is not None else ""
            print(f"sslray: WARNING: the TensorBoard mirror{where} failed ({type(e).__name__}: {e}); this "
                  "process writes no more events for the run (MLflow has everything)")
            self._mirror, self._mirror_read = None, True

    @property
    def client(self):
        if self._c is None:
            self._c = _client(self.uri)
        return self._c

    @classmethod
    def start(cls, uri: Optional[str], experiment: str, run_name: str, tags: Mapping[str, str] = (),
              parent_run_id: Optional[str] = None) -> "Tracker":
        uri = resolve_uri(uri)
        c = _client(uri)
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            root = artifact_root(uri)
            exp_id = c.create_experiment(experiment, artifact_location=(Path(root) / folder_name(experiment)).as_uri()
                                         if root else None)
        else:
            check_active(exp, uri)
            exp_id = exp.experiment_id
        all_tags = {"sslray.git_sha": git_sha(), **dict(tags)}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
        t = cls(uri, run.info.run_id)
        t._c = c
        from .tbmirror import mirror_of

        t._mirror, t._mirror_read = mirror_of(all_tags), True
        return t

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, param_text(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self._mirrored("params", {p.key: p.value for p in items})

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])
        if items:
            self._mirrored("metrics", {m.key: m.value for m in items}, int(step or 0))

    def clear_metrics(self, keys: Iterable[str]) -> None:
        """Make NaN the latest value of ``keys``: numbers an earlier call logged that no longer hold (a
        probe re-run without its baseline leaves no random-init score to pair with). MLflow cannot delete
        a metric; the UI and ``sslray compare`` show NaN as no value, and the history keeps the old one.
        MLflow's latest value is the highest step, then the newest time: the keys cleared here (probe
        and eval scores) are all logged at step 0. The TensorBoard mirror keeps its old points."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float("nan"), ts, 0) for k in sorted(set(keys))]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | os.PathLike, subdir: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), subdir)
        if str(path).lower().endswith(".png"):  # figures and view grids; other files stay in MLflow only
            self._mirrored("image", path, f"{subdir}/{Path(path).stem}" if subdir else Path(path).stem)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)
        self._mirrored("text", text, name)

    def log_figure(self, fig, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(name).name
            fig.savefig(p, dpi=110, bbox_inches="tight")
            sub = str(Path(name).parent) if str(Path(name).parent) != "." else None
            self.log_artifact(p, sub)

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.step)]

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def existing_run(uri: Optional[str], run_id: str, option: str = "--run-id") -> Tracker:
    """The run a command is told to log to (``--run-id``), checked before any work: a run id that is not
    in the store, or a sqlite store that is not there (a relative default URI read from another folder),
    is named with the URI, and no empty store is created for the lookup."""
    from mlflow.exceptions import MlflowException

    resolved = resolve_uri(uri)
    hint = "pass --tracking-uri of the store that holds it"
    where = local_store(resolved)
    if where is not None and not os.path.exists(where):
        raise ValueError(f"{option} {run_id}: there is no MLflow store at {where}; {hint}")
    tracker = Tracker(resolved, run_id)
    try:
        tracker.client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ValueError(f"{option} {run_id}: no such run in {resolved}; {hint}") from None
        raise ValueError(f"{option} {run_id}: the MLflow store {resolved} could not be read "
                         f"({' '.join(str(e).split())[:300]})") from None
    return tracker


def local_store(uri: str) -> Optional[str]:
    """The file or folder of a local MLflow store (``sqlite:///path``, a file store path or ``file://``
    URI), else None (a server)."""
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///"):].split("?", 1)[0]
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return uri if "://" not in uri and uri not in BARE_SCHEMES else None


def same_store(a: str, b: str) -> bool:
    """Two tracking URIs that name one store, however spelled (a trailing slash, a folder and its file://)."""
    la, lb = local_store(a), local_store(b)
    if la is not None and lb is not None:
        return os.path.normpath(la) == os.path.normpath(lb)
    return a.rstrip("/") == b.rstrip("/")


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


# --- reading runs back (sslray compare, the UI test) -------------------------------------------

KIND_TAG = "sslray.kind"  # "compare" marks a summary run that compares others; compares skip it
SWEEP_PARENT_TAG = "sslray.tune.parent"  # "true" on the parent run of a sweep or a study (its trials are children)


class RunRecord:
    """One MLflow run as plain dicts: what ``sslray compare`` reads, with no MLflow types leaking out."""

    def __init__(self, run_id: str, name: str, status: str, params: Mapping[str, str],
                 metrics: Mapping[str, float], tags: Mapping[str, str], start_time: int = 0):
        self.run_id, self.name, self.status = run_id, name, status
        self.params, self.metrics, self.tags = dict(params), dict(metrics), dict(tags)
        self.start_time = start_time

    @classmethod
    def from_run(cls, run) -> "RunRecord":
        return cls(run.info.run_id, run.info.run_name or run.data.tags.get("mlflow.runName", ""), run.info.status,
                   run.data.params, run.data.metrics, run.data.tags, run.info.start_time or 0)

    def __repr__(self) -> str:
        return f"RunRecord({self.name!r}, {self.run_id[:8]}, {self.status})"


def check_active(exp, uri: str) -> None:
    """MLflow keeps a deleted experiment's name (and refuses new runs in it) until it is purged."""
    if exp.lifecycle_stage == "deleted":
        raise ValueError(f"MLflow experiment {exp.name!r} in {uri} was deleted: restore it (`mlflow experiments "
                         f"restore --experiment-id {exp.experiment_id}` or the UI), purge it (`mlflow gc "
                         f"--backend-store-uri {uri}`), or use another --experiment")


def experiment_id(uri: Optional[str], experiment: str) -> str:
    """The id of ``experiment`` in the store at ``uri``; a clear error naming the known ones if absent."""
    c = _client(resolve_uri(uri))
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in c.search_experiments())
        raise ValueError(f"no MLflow experiment {experiment!r} in {resolve_uri(uri)}; "
                         f"known: {', '.join(names) or '(none)'}")
    check_active(exp, resolve_uri(uri))
    return exp.experiment_id


def search_runs(uri: Optional[str], experiment: str, run_ids: Optional[list[str]] = None,
                exclude_kinds: tuple[str, ...] = ("compare",), finished_only: bool = True) -> list[RunRecord]:
    """Runs of ``experiment`` oldest first. ``run_ids`` picks runs by id (a unique prefix is enough) and
    keeps them whatever their status; otherwise only FINISHED runs, minus runs tagged with an excluded kind."""
    uri = resolve_uri(uri)
    c = _client(uri)
    exp_id = experiment_id(uri, experiment)
    runs, token = [], None
    while True:
        page = c.search_runs([exp_id], max_results=1000, page_token=token, order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            break
    recs = [RunRecord.from_run(r) for r in runs]
    if run_ids:
        picked = {}  # by run id: a run named twice (full id and a prefix) is one row
        for rid in run_ids:
            hits = [r for r in recs if r.run_id.startswith(rid)]
            if len(hits) != 1:
                raise ValueError(f"run id {rid!r} matches {len(hits)} runs of experiment {experiment!r}")
            picked.setdefault(hits[0].run_id, hits[0])
        return list(picked.values())
    return [r for r in recs if r.tags.get(KIND_TAG) not in exclude_kinds
            and (r.status == "FINISHED" or not finished_only)]


def metric_histories(uri: Optional[str], run_id: str, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` sorted by step, for each of ``keys`` (empty list when not logged)."""
    t = Tracker(uri, run_id)
    return {k: t.history(k) for k in keys}
