"""What a training run reports to MLflow while it trains: the Train controller's callback that logs rank
0's metrics as each report lands (and keeps what an MLflow outage stops it logging), the health tags of
an epoch, and the PNGs rank 0 writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from ..storage import checkpoint_uri, filesystem
from ..tracking import Tracker, numeric

try:  # Ray Train V2 driver callbacks run in the train controller, never on the workers.
    from ray.train import UserCallback as _UserCallback
except ImportError:  # pragma: no cover - older Ray
    from ray.train.v2.api.callback import UserCallback as _UserCallback

MAX_PENDING_STEP_REPORTS = 1000  # step_loss points kept while MLflow cannot be written


class MLflowReportCallback(_UserCallback):
    """Logs rank 0's per-epoch metrics to one MLflow run as each ``ray.train.report`` lands.

    It runs in the Train controller (one process), so sqlite sees a single writer. An exception raised
    here would end training whatever ``max_failures`` says (Train retries no controller error), so a
    failed write (a server restart, a locked sqlite file, an S3 error) is one warning: what it could not
    log is kept, with its steps, and retried at the next report and by the driver after ``fit()``.
    """

    def __init__(self, tracking_uri: str, run_id: str, pictures_dir: Optional[str] = None, storage: str = ""):
        self.tracking_uri = tracking_uri
        self.storage = storage
        self.run_id = run_id
        self.pictures_dir = pictures_dir
        self._tracker: Optional[Tracker] = None
        self._nodes: Optional[list] = None
        self._pictures: dict[str, int] = {}  # name -> size already logged
        self._pending: dict = {"metrics": [], "tags": {}}  # not logged yet: [(values, step), ...], tags
        self._failing = False  # in an MLflow outage (warned once)
        # The controller is an actor on the driver's node with its own copy of this object: what it could
        # not log is also kept in this file, for the driver after fit() and for a resumed run (same run id).
        self.pending_file = str(Path(tempfile.gettempdir()) / f"sslray-mlflow-pending-{run_id}.json")

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if not metrics:
            return
        m = metrics[0]
        try:
            if self._tracker is None:
                self._tracker = Tracker(self.tracking_uri, self.run_id)
                self._pending = read_pending(self.pending_file)  # what an earlier attempt left unlogged
            tags: dict[str, Any] = {}
            nodes = sorted({str(x.get("node_id")) for x in metrics if x.get("node_id")})
            if nodes and nodes != self._nodes:
                self._nodes = nodes
                tags.update({"sslray.num_nodes": len(nodes), "sslray.nodes": ",".join(n[:12] for n in nodes)})
            if m.get("partial"):  # a step-level report inside an epoch: its own curve, keyed by global step
                self._pending["metrics"].append(({"step_loss": m["step_loss"]}, int(m["step"])))
            else:
                self._pending["metrics"].append((numeric(m), int(m.get("epoch", 0))))
                tags.update(health_tags(m))
            if checkpoint is not None:
                tags["sslray.last_checkpoint"] = checkpoint_uri(checkpoint, self.storage)
            self._pending["tags"].update(tags)
            flush_pending(self._tracker, self._pending)
            if self.pictures_dir:  # one that fails is logged at the next report, or by log_missing_pictures
                log_pictures(self._tracker, self.pictures_dir, self._pictures)
            if self._failing:
                print("sslray: MLflow logging works again; the reports it missed are logged")
                self._failing = False
        except Exception as e:  # noqa: BLE001 - raised here, it would end a healthy training run
            where = f"step {m.get('step')}" if m.get("partial") else f"epoch {m.get('epoch', 0)}"
            if not self._failing:  # once per outage, not at every report
                print(f"sslray: WARNING: MLflow logging at {where} failed ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:300]}); training goes on, and the reports it misses are "
                      "retried at the next report and after the run")
            self._failing = True
            # A long outage with step-level reports: their curve keeps its newest points (epoch metrics
            # are all kept), so what waits in memory and in the pending file stays bounded.
            steps = [i for i, (values, _) in enumerate(self._pending["metrics"]) if set(values) == {"step_loss"}]
            for i in reversed(steps[:-MAX_PENDING_STEP_REPORTS]):
                del self._pending["metrics"][i]
        keep_pending(self.pending_file, self._pending)

    def log_pending(self, tracker: Tracker) -> None:
        """On the driver after ``fit()``: log what the controller's copy of this callback could not."""
        pending = read_pending(self.pending_file)
        if not (pending["metrics"] or pending["tags"]):
            return
        try:
            flush_pending(tracker, pending)
        except Exception as e:  # noqa: BLE001 - training is done; the curves and checkpoint tag still follow
            print(f"sslray: WARNING: {len(pending['metrics'])} report(s) of metrics could not be logged to MLflow "
                  f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); they are kept in {self.pending_file}")
        keep_pending(self.pending_file, pending)


def flush_pending(tracker: Tracker, pending: dict) -> None:
    """Log ``pending`` (``{"metrics": [(values, step), ...], "tags": {...}}``, oldest first), emptying it
    as it goes: a write that fails leaves only what it did not log, each report with its own step."""
    metrics, tags = pending["metrics"], pending["tags"]
    while metrics:
        values, step = metrics[0]
        tracker.log_metrics(values, step=step)
        metrics.pop(0)
    if tags:
        tracker.set_tags(tags)
        tags.clear()


def read_pending(path: str) -> dict:
    try:
        with open(path) as f:
            pending = json.load(f)
        return {"metrics": list(pending["metrics"]), "tags": dict(pending["tags"])}
    except (OSError, ValueError, KeyError, TypeError):  # none kept (the usual case), or a file cut short
        return {"metrics": [], "tags": {}}


def keep_pending(path: str, pending: dict) -> None:
    """Write what is still unlogged to ``path``, or remove it once everything is logged."""
    try:
        if pending["metrics"] or pending["tags"]:
            with open(path + ".tmp", "w") as f:
                json.dump(pending, f)
            os.replace(path + ".tmp", path)  # never a half-written file for the driver to read
        elif os.path.exists(path):
            os.remove(path)
    except OSError as e:  # the values are still in memory, for the next report
        print(f"sslray: WARNING: could not keep the unlogged MLflow values in {path} ({e})")


COLLAPSE_TAG = "sslray.collapse_warning"
NONFINITE_TAG = "sslray.nonfinite_steps"


def health_tags(m: dict) -> dict:
    """MLflow tags for an epoch whose monitors tripped (the text names the epoch and the statistics)."""
    from .monitors import collapse_report

    tags = {}
    _, lines = collapse_report(m)
    if lines:
        tags[COLLAPSE_TAG] = f"epoch {int(m.get('epoch', 0))}: " + " | ".join(lines)
    if m.get("nonfinite_skipped_frac", 0) > 0:
        tags[NONFINITE_TAG] = f"epoch {int(m.get('epoch', 0))}: {m['nonfinite_skipped_frac']:.2%} of steps skipped"
    return tags


def log_pictures(tracker: Tracker, folder: str, seen: dict[str, int]) -> list[str]:
    """Log the PNGs rank 0 wrote into ``folder`` (local or pyarrow URI) that are new or changed since
    the last call, as artifacts under ``pictures/``; ``seen`` remembers name -> size."""
    import tempfile

    import pyarrow.fs as pafs

    fs, path = filesystem(folder)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
             if i.type == pafs.FileType.File and i.base_name.endswith(".png") and not i.base_name.startswith(".")]
    new = [i for i in infos if seen.get(i.base_name) != i.size]
    if not new:
        return []
    with tempfile.TemporaryDirectory(prefix="sslray-pictures-") as d:
        for info in new:
            local = Path(d) / info.base_name
            with fs.open_input_stream(info.path) as f:
                local.write_bytes(f.read())
            tracker.log_artifact(local, "pictures")
            seen[info.base_name] = info.size
    return [i.base_name for i in new]


def log_missing_pictures(tracker: Tracker, folder: str) -> list[str]:
    """``log_pictures`` for the driver at the end of a run: the callback that logged the others ran in
    Train's controller process, so what the run already holds under ``pictures/`` (same name and size)
    is the ``seen`` it starts from, and is not downloaded and logged again."""
    logged = {Path(a.path).name: a.file_size for a in tracker.client.list_artifacts(tracker.run_id, "pictures")}
    return log_pictures(tracker, folder, logged)
