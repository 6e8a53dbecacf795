"""TensorBoard mirror of a run's MLflow logging (``tracking.tensorboard``).

MLflow stays the record (compare, ui, tune and study read it back); teams whose dashboards are
TensorBoard get every metric, figure and the config of a run as event files too. A run that mirrors
carries its log folder in the MLflow tag ``sslray.tensorboard``, so whatever logs to that run later
(the training callback, the end-of-run probe, ``sslray eval``, a resumed run) writes to the same
folder without being told again. Events are written with tensorboardX (a Ray Tune dependency); viewing
them needs ``pip install tensorboard`` and ``tensorboard --logdir <folder>``.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

TB_TAG = "sslray.tensorboard"

# log folder -> events file writer: one file per process and run, the most recently used ones kept
# open (a sweep's driver logs for hundreds of trials; each open file is a descriptor)
_writers: "OrderedDict[str, Any]" = OrderedDict()
MAX_OPEN = 16
_opened = 0  # writers made by this process: in the file name, so a reopened folder never reuses a name
_lock = threading.Lock()


def run_logdir(folder: str, *names: str) -> str:
    """The absolute log folder of one run under ``tracking.tensorboard``: ``<folder>/<name>/...``,
    resolved where the run starts (the processes that log later may have another working folder)."""
    return str(Path(folder, *names).expanduser().resolve())


def _write(logdir: str, summary, step: int) -> None:
    """Append one summary to this process's events file in ``logdir``, on disk when this returns.

    tensorboardX's SummaryWriter queues events for a background thread, and its flush() does not wait
    for that queue: the Train controller, ended without notice, would lose the last epochs. Its
    synchronous file writer is used instead; the pid in the file name keeps two processes of one host
    (the controller and the driver) out of each other's file. A folder whose writer was closed to keep
    ``MAX_OPEN`` gets a new file when written again; TensorBoard reads a folder's files as one run."""
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event

    global _opened
    with _lock:
        w = _writers.pop(logdir, None)
        if w is None:
            os.makedirs(logdir, exist_ok=True)
            _opened += 1
            # the file name holds the time in whole seconds: the pid and a count keep names apart
            w = EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}.{_opened}")
            while len(_writers) >= MAX_OPEN:
                _writers.popitem(last=False)[1].close()
        _writers[logdir] = w  # the most recently used last
        w.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))
        w.flush()


class Mirror:
    """Writes what a ``Tracker`` logs to MLflow into ``logdir``; each call is flushed, so a killed
    process loses nothing it logged (the training callback's process is ended without notice)."""

    def __init__(self, logdir: str):
        self.logdir = logdir

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import scalar

        _write(self.logdir, Summary(value=[v for k, x in values.items() for v in scalar(k, x).value]), step)

    def params(self, params: Mapping[str, str]) -> None:
        # One markdown table: TensorBoard's text tab shows it as the run's config.
        rows = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in sorted(params.items()))
        self.text("| key | value |\n|---|---|\n" + rows, "params", fenced=False)

    def text(self, text: str, name: str, fenced: bool = True) -> None:
        from tensorboardX.summary import text as summary

        _write(self.logdir, summary(name, f"```\n{text}\n```" if fenced else text), 0)

    def image(self, path: str | os.PathLike, name: str, step: int = 0) -> None:
        import numpy as np
        from PIL import Image
        from tensorboardX.summary import image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        _write(self.logdir, image(name, pixels, dataformats="HWC"), step)


def mirror_of(tags: Mapping[str, str]) -> Optional[Mirror]:
    logdir = tags.get(TB_TAG)
    return Mirror(logdir) if logdir else None
