"""tracking.tensorboard: a run's MLflow logging mirrored as TensorBoard events, by every writer of the run."""

from __future__ import annotations

import pytest

from conftest import tb_events


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture
def tagged_run(tmp_path):
    from sslray.tbmirror import TB_TAG, run_logdir
    from sslray.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logdir = run_logdir(str(tmp_path / "tb"), "run-a")
    return Tracker.start(uri, "tb", "run-a", tags={TB_TAG: logdir}), logdir


def test_metrics_params_text_and_figures_reach_the_events(tagged_run):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, logdir = tagged_run
    t.log_params({"optim.base_lr": 0.3, "method.name": "simclr"})
    t.log_metrics({"loss": 2.5, "knn_top1": 0.25}, step=1)
    t.log_metrics({"loss": 2.0, "knn_top1": 0.4, "skipped": float("nan")}, step=2)
    t.log_text("method:\n  name: simclr\n", "config.yaml")
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    t.log_figure(fig, "curves/loss.png")
    plt.close(fig)

    ev = tb_events(logdir)
    assert ev["scalars"]["loss"] == [(1, 2.5), (2, 2.0)]
    assert ev["scalars"]["knn_top1"] == [(1, 0.25), (2, pytest.approx(0.4))]
    assert "skipped" not in ev["scalars"]  # what MLflow is not given (non-finite) is not mirrored either
    assert "| optim.base_lr | 0.3 |" in ev["texts"]["params"] and "name: simclr" in ev["texts"]["config.yaml"]
    assert "curves/loss" in ev["images"] and min(ev["images"]["curves/loss"]) > 10
    # MLflow, the record, has the same
    assert [m.value for m in _client(t.uri).get_metric_history(t.run_id, "loss")] == [2.5, 2.0]


def test_a_later_writer_of_the_run_mirrors_into_the_same_folder(tagged_run):
    """`sslray eval` and the end-of-run probe open the run by id: the run's tag tells them the folder."""
    from sslray.tracking import Tracker

    t, logdir = tagged_run
    t.log_metrics({"loss": 1.0}, step=1)
    later = Tracker(t.uri, t.run_id)
    later.log_metrics({"eval_linear_top1": 0.6})
    ev = tb_events(logdir)
    assert ev["scalars"]["eval_linear_top1"] == [(0, pytest.approx(0.6))] and ev["scalars"]["loss"] == [(1, 1.0)]


def test_a_run_without_the_tag_writes_no_events(tmp_path, monkeypatch):
    from sslray.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    t = Tracker.start(f"sqlite:///{tmp_path / 'mlflow.db'}", "tb", "plain")
    t.log_metrics({"loss": 1.0}, step=1)
    assert t.mirror() is None and not list(tmp_path.rglob("events.out.tfevents.*"))


def test_a_failing_mirror_warns_once_and_mlflow_keeps_everything(tmp_path, capsys):
    from sslray.tbmirror import TB_TAG
    from sslray.tracking import Tracker

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    t = Tracker.start(f"sqlite:///{tmp_path / 'mlflow.db'}", "tb", "r", tags={TB_TAG: str(blocker / "run")})
    t.log_metrics({"loss": 1.0}, step=1)
    t.log_metrics({"loss": 0.5}, step=2)
    out = capsys.readouterr().out
    assert out.count("TensorBoard mirror") == 1 and str(blocker) in out
    assert [m.value for m in _client(t.uri).get_metric_history(t.run_id, "loss")] == [1.0, 0.5]


def test_the_training_callback_mirrors_epoch_and_step_reports(tagged_run, tmp_path):
    """The Train controller's callback logs through a Tracker it opens by run id."""
    from sslray.raytrain.reporting import MLflowReportCallback

    t, logdir = tagged_run
    cb = MLflowReportCallback(t.uri, t.run_id)
    cb.pending_file = str(tmp_path / "pending.json")
    cb.after_report(None, [{"partial": True, "step": 7, "step_loss": 3.0}], None)
    cb.after_report(None, [{"epoch": 1, "loss": 2.0, "knn_top1": 0.3}], None)
    ev = tb_events(logdir)
    assert ev["scalars"]["step_loss"] == [(7, 3.0)] and ev["scalars"]["loss"] == [(1, 2.0)]


def test_a_uri_is_refused_by_key():
    from sslray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="tracking.tensorboard"):
        load_config("smoke", {"tracking.tensorboard": "s3://bucket/tb"})
    assert load_config("smoke", {"tracking.tensorboard": "tb"}).tracking.tensorboard == "tb"


def test_a_sweeps_trials_mirror_side_by_side(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from sslray.config import load_config
    from sslray.tracking import Tracker
    from sslray.tune.mlflow_callback import MLflowSweepCallback

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker.start(uri, "tb", "sweep")
    base = load_config("smoke", {"tracking.tensorboard": "tb"}).to_dict()
    cb = MLflowSweepCallback(uri, "tb", parent.run_id, "sweep", base, max_epochs=2)
    for tid, lr in (("t1", 0.1), ("t2", 0.2)):
        trial = SimpleNamespace(trial_id=tid, config={"optim.base_lr": lr})
        cb.on_trial_start(0, [], trial)
        cb.on_trial_result(0, [], trial, {"epoch": 1, "knn_top1": lr})
    for tid, lr in (("t1", 0.1), ("t2", 0.2)):
        assert tb_events(tmp_path / "tb" / "sweep" / tid)["scalars"]["knn_top1"] == [(1, pytest.approx(lr))]


def test_a_sweeps_many_runs_keep_few_files_open_and_lose_no_event(tmp_path, monkeypatch):
    """A sweep driver mirrors hundreds of trials: only the most recently used writers stay open; a run
    written again after its writer was closed gets a second file, read with the first as one run."""
    from sslray import tbmirror

    monkeypatch.setattr(tbmirror, "_writers", type(tbmirror._writers)())
    monkeypatch.setattr(tbmirror, "MAX_OPEN", 2)
    runs = [tbmirror.Mirror(str(tmp_path / f"trial{i}")) for i in range(3)]
    for step in (1, 2):
        for m in runs:
            m.metrics({"loss": float(step)}, step)
            assert len(tbmirror._writers) <= 2
    for m in runs:
        assert tb_events(m.logdir)["scalars"]["loss"] == [(1, 1.0), (2, 2.0)]
    assert len(list((tmp_path / "trial0").glob("events.out.tfevents.*"))) == 2  # closed, then reopened


def test_a_resumed_run_starts_mirroring_or_keeps_its_folder(tmp_path, capsys):
    from sslray.config import load_config
    from sslray.raytrain.trainer import resume_mirror
    from sslray.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker.start(uri, "tb", "r")  # a run started without the mirror
    resume_mirror(Tracker(uri, t.run_id), load_config("smoke"), "r")  # resumed without it: nothing
    assert Tracker(uri, t.run_id).mirror() is None
    resume_mirror(Tracker(uri, t.run_id), load_config("smoke", {"tracking.tensorboard": str(tmp_path / "a")}), "r")
    later = Tracker(uri, t.run_id)  # the tag tells every later writer
    assert later.mirror().logdir == str(tmp_path / "a" / "r")
    later.log_metrics({"loss": 1.0}, step=3)
    resume_mirror(Tracker(uri, t.run_id), load_config("smoke", {"tracking.tensorboard": str(tmp_path / "b")}), "r")
    assert "goes on there" in capsys.readouterr().out and Tracker(uri, t.run_id).mirror().logdir.endswith("a/r")
    assert tb_events(tmp_path / "a")["scalars"]["loss"] == [(3, 1.0)] and not (tmp_path / "b").exists()
