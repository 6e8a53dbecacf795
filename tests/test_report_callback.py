"""The driver-side MLflow callback (fast, no Ray cluster): it runs in Ray Train's controller, where an
exception would end the training run (Train retries no controller error), so a failed MLflow write is a
warning, and what it could not log reaches the run later with its original steps."""

from __future__ import annotations

import pickle
import sqlite3
import tempfile
import types

import pytest


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A sqlite MLflow run, the pending file under tmp_path, and ``fail``: the set of reports (by step)
    whose ``log_batch`` raises what ``fail.error`` holds (a locked sqlite file unless changed)."""
    pytest.importorskip("ray")
    from mlflow.tracking import MlflowClient

    from sslray.tracking import Tracker

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.start(uri, "report-callback", "r")
    fail = types.SimpleNamespace(steps=set(), error=sqlite3.OperationalError("database is locked"))
    real = MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), *a, **k):
        if any(m.step in fail.steps for m in metrics):
            raise fail.error
        return real(self, run_id, metrics, *a, **k)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    return types.SimpleNamespace(uri=uri, tracker=tracker, fail=fail, client=MlflowClient(uri), dir=tmp_path)


def epoch(n: int) -> list[dict]:
    m = {"epoch": n, "step": 100 * n, "loss": 5.0 - n, "lr": 0.1}
    return [m, dict(m)]  # one dict per worker, rank 0 first


def ckpt(name: str):
    return types.SimpleNamespace(path=f"/runs/r/{name}")


def history(run, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(run.client.get_metric_history(run.tracker.run_id, key),
                                             key=lambda m: m.step)]


def last_checkpoint(run) -> str:
    return run.client.get_run(run.tracker.run_id).data.tags.get("sslray.last_checkpoint", "")


def test_a_failed_report_warns_and_is_logged_at_the_next_one_with_its_step(run, capsys):
    from sslray.raytrain.reporting import MLflowReportCallback

    cb = MLflowReportCallback(run.uri, run.tracker.run_id)
    cb.after_report(None, epoch(1), ckpt("epoch_1"))
    run.fail.steps = {2}
    cb.after_report(None, epoch(2), ckpt("epoch_2"))  # must not raise: it would end training
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "Traceback" not in out
    assert "epoch 2" in warnings[0] and "OperationalError: database is locked" in warnings[0]
    assert history(run, "loss") == [(1, 4.0)] and last_checkpoint(run) == "/runs/r/epoch_1"
    run.fail.steps = set()
    cb.after_report(None, epoch(3), ckpt("epoch_3"))
    assert history(run, "loss") == [(1, 4.0), (2, 3.0), (3, 2.0)]  # epoch 2 at step 2, not shifted
    assert last_checkpoint(run) == "/runs/r/epoch_3"
    assert "WARNING" not in capsys.readouterr().out
    assert not list(run.dir.glob("sslray-mlflow-pending-*"))  # nothing left for the driver to log


def test_the_driver_logs_what_the_last_reports_could_not(run, capsys):
    from sslray.raytrain.reporting import MLflowReportCallback

    driver = MLflowReportCallback(run.uri, run.tracker.run_id)
    controller = pickle.loads(pickle.dumps(driver))  # Ray ships a copy to the controller actor
    controller.after_report(None, epoch(1), ckpt("epoch_1"))
    run.fail.steps = {150, 2}  # the store goes away until the end of training
    step = {"epoch": 1, "step": 150, "step_loss": 3.5, "partial": 1}
    controller.after_report(None, [step, dict(step)], ckpt("step_150"))
    controller.after_report(None, epoch(2), ckpt("epoch_2"))
    # one warning per outage, not one per report
    assert len([line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]) == 1
    assert history(run, "loss") == [(1, 4.0)]
    assert list(run.dir.glob("sslray-mlflow-pending-*"))  # kept where the driver finds it
    run.fail.steps = set()
    driver.log_pending(run.tracker)  # pretrain, after fit() returns
    assert history(run, "loss") == [(1, 4.0), (2, 3.0)]
    assert history(run, "step_loss") == [(150, 3.5)]  # keyed by its global step, like any step report
    assert last_checkpoint(run) == "/runs/r/epoch_2"
    driver.log_pending(run.tracker)  # logged once: nothing is left to log again
    assert history(run, "loss") == [(1, 4.0), (2, 3.0)]


def test_an_interrupt_is_not_swallowed(run):
    from sslray.raytrain.reporting import MLflowReportCallback

    cb = MLflowReportCallback(run.uri, run.tracker.run_id)
    run.fail.steps, run.fail.error = {1}, KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        cb.after_report(None, epoch(1), None)
