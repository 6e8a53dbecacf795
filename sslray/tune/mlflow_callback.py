"""Driver-side MLflow logging for a sweep: one nested child run per trial under the sweep's parent run.

A Tune ``Callback`` runs in the Tune driver process only, so sqlite sees one writer however many
trials run. Child runs are found again by their tags (parent id + trial id), not by state kept in
memory: a resumed sweep driver logs into the same child runs as the one that was killed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.tune import Callback

from ..config import ConfigError, effective_lr, flatten, from_dict
from ..tbmirror import TB_TAG, run_logdir
from ..tracking import Tracker, numeric
from .space import trial_config
from .trial import failure_reason

TRIAL_TAG = "sslray.tune.trial_id"
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "sslray.tune.sweep"

# Tune's auto-filled bookkeeping: not training metrics.
_TUNE_KEYS = {
    "training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid", "time_since_restore",
    "iterations_since_restore", "done", "node_ip", "hostname", "date", "trial_id", "experiment_tag",
    "warmup_time", "checkpoint_dir_name", "should_checkpoint",
}


def training_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in numeric(result).items() if k not in _TUNE_KEYS and "/" not in k}


class MLflowSweepCallback(Callback):
    """Creates/reuses a child run per trial: params at start, per-epoch metrics (step = epoch) as
    results land, FINISHED/FAILED at the end with the failure reason and whether it was stopped early.

    A trial whose sampled values the config rejects still gets its child run (sampled values and the
    error as ``sslray.config_error``); the trial itself then fails on the same error and is recorded
    as failed. Raising here, in the Tune driver, would stop the whole sweep."""

    forced: Mapping[str, Any] = {}  # SweepSpec.forced (callbacks pickled before it existed have none)

    def __init__(self, uri: str, experiment: str, parent_run_id: str, sweep_name: str, base: dict,
                 max_epochs: int, forced: Mapping[str, Any] | None = None):
        self.uri, self.experiment, self.parent_run_id = uri, experiment, parent_run_id
        self.sweep_name, self.base, self.max_epochs = sweep_name, base, max_epochs
        self.forced = dict(forced or {})
        self._runs: dict[str, str] = {}
        self._parent: Tracker | None = None

    # Tune pickles callbacks with the Tuner: keep MLflow clients out of the pickle.
    def __getstate__(self):
        d = dict(self.__dict__)
        d["_parent"] = None
        return d

    @property
    def parent(self) -> Tracker:
        if self._parent is None:
            self._parent = Tracker(self.uri, self.parent_run_id)
        return self._parent

    def _find_child(self, trial_id: str) -> str | None:
        if trial_id in self._runs:
            return self._runs[trial_id]
        c = self.parent.client
        exp_id = c.get_run(self.parent_run_id).info.experiment_id
        found = c.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and "
                                                      f"tags.`{TRIAL_TAG}` = '{trial_id}'")
        if found:
            self._runs[trial_id] = found[0].info.run_id
            return self._runs[trial_id]
        return None

    def _child(self, trial) -> Tracker:
        run_id = self._find_child(trial.trial_id)
        if run_id is not None:
            return Tracker(self.uri, run_id)
        sampled = {f"sampled.{k}": v for k, v in trial.config.items() if not k.startswith("_")}
        tags = {TRIAL_TAG: trial.trial_id, SWEEP_TAG: self.sweep_name}
        try:
            cfg = trial_config(from_dict(self.base), trial.config, self.forced)
        except (ConfigError, OSError, TypeError, ValueError) as e:  # the trial fails on it; the sweep goes on
            tags["sslray.config_error"], params = str(e)[:5000], sampled
        else:
            tags.update({"sslray.method": cfg.method.name, "sslray.backbone": cfg.model.backbone})
            if cfg.tracking.tensorboard:  # a sweep's trials side by side: <folder>/<sweep>/<trial>
                tags[TB_TAG] = run_logdir(cfg.tracking.tensorboard, self.sweep_name, trial.trial_id)
            params = {**flatten(cfg), **sampled, "derived.effective_lr": effective_lr(cfg)}
        t = Tracker.start(self.uri, self.experiment, f"{self.sweep_name}-{trial.trial_id}", tags=tags,
                          parent_run_id=self.parent_run_id)
        t.log_params(params)
        self._runs[trial.trial_id] = t.run_id
        return t

    def on_trial_start(self, iteration, trials, trial, **info):
        t = self._child(trial)
        t.client.update_run(t.run_id, status="RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        m = training_metrics(result)
        if m:
            self._child(trial).log_metrics(m, step=int(result.get("epoch", result.get("training_iteration", 0))))

    def on_trial_complete(self, iteration, trials, trial, **info):
        t = self._child(trial)
        last = trial.last_result or {}
        epochs = int(last.get("epoch", 0))
        t.set_tags({"sslray.tune.status": "stopped_early" if epochs < self.max_epochs else "completed",
                    "sslray.tune.epochs": epochs})
        t.end("FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        t = self._child(trial)
        reason = failure_reason(read_error(trial))
        t.set_tags({"sslray.tune.status": "failed", "sslray.failure": reason})
        t.end("FAILED")


def read_error(trial) -> str:
    """The error text Tune stored for a failed trial (its traceback), or ''."""
    path = getattr(trial, "error_file", None)
    if path:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            pass
    return str(getattr(trial, "error_msg", "") or "")
