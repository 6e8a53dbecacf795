"""What `sslray pretrain`, `probe` and `eval` check before their long work, and how a finished
training run ends when the work after it fails."""

from __future__ import annotations

import pytest

from sslray.cli import AFTER_TRAINING_TAG, main, run_pretrain
from sslray.config import load_config
from sslray.tracking import Tracker


@pytest.fixture
def store(tmp_path) -> tuple[str, str]:
    """An MLflow sqlite store holding one run: ``(uri, run_id)``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, Tracker.start(uri, "e", "r").run_id


@pytest.mark.parametrize("command", ["probe", "eval"])
def test_a_run_id_that_is_not_there_fails_before_any_feature_is_extracted(command, store, tmp_path, capsys,
                                                                          monkeypatch):
    """The whole probe used to run first, then MLflow raised; from another folder the default store
    was created empty for the lookup."""
    from sslray.eval import features, runner
    from sslray.raytrain import evaluate

    uri, _ = store
    monkeypatch.setattr(evaluate, "probe_checkpoint", lambda *a, **k: pytest.fail("the probe ran"))
    monkeypatch.setattr(runner, "run_eval", lambda *a, **k: pytest.fail("the protocols ran"))
    monkeypatch.setattr(features, "FeatureStore", lambda *a, **k: pytest.fail("features were extracted"))
    argv = {"probe": ["probe", "--checkpoint", "ckpt", "--train", "t.beton", "--val", "v.beton"],
            "eval": ["eval", "--checkpoint", "ckpt", "--protocol", "knn"]}[command]
    assert main([*argv, "--run-id", "deadbeef", "--tracking-uri", uri]) == 2
    assert f"--run-id deadbeef: no such run in {uri}" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "..")  # the default store, relative to a folder that has none
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main([*argv, "--run-id", store[1]]) == 2
    assert "there is no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / ".." / "mlflow.db").exists()


def test_eval_without_a_val_split_and_a_single_class_val_fail_before_training(tmp_path, monkeypatch):
    from PIL import Image

    from sslray.datasets import WriteParams, convert
    from sslray.raytrain import trainer

    monkeypatch.setattr(trainer, "pretrain", lambda *a, **k: pytest.fail("training started"))
    cfg = load_config("smoke", ["data.train=/d/t.beton", "data.val="])
    with pytest.raises(ValueError, match="--eval linear scores the checkpoint on a val split: give --val"):
        run_pretrain(cfg, eval_protocols="linear")
    (tmp_path / "src" / "cat").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 50, 90)).save(tmp_path / "src" / "cat" / f"{i}.png")
    one = str(tmp_path / "one.beton")
    convert(tmp_path / "src", one, params=WriteParams(max_resolution=8), workers=1, verbose=False)
    with pytest.raises(ValueError, match=r"val split .*one.beton has one class only \(cat\).*--no-probe"):
        run_pretrain(cfg.replace(**{"data.train": one, "data.val": one, "data.batch_size": 2, "ray.num_workers": 1}))


def test_a_failure_after_training_ends_the_run_finished_with_a_tag(store, monkeypatch):
    """The probe or --eval failing after hours of training left the MLflow run RUNNING for good (and out of
    `sslray compare`); training itself finished and its checkpoint is kept."""
    from sslray.raytrain import evaluate, trainer

    uri, run_id = store
    res = trainer.PretrainResult(run_id, uri, "/runs/r/checkpoint_000001", {}, "r", "/runs")
    monkeypatch.setattr(trainer, "pretrain", lambda *a, **k: res)

    def probe_fails(*a, **k):
        raise RuntimeError("the probe ran out of memory")

    monkeypatch.setattr(evaluate, "probe_checkpoint", probe_fails)
    cfg = load_config("smoke", ["data.train=/d/t.beton", "data.val=/d/v.beton", "train.export_backbone=false"])
    with pytest.raises(RuntimeError, match="out of memory"):
        run_pretrain(cfg)
    run = Tracker(uri, run_id).client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[AFTER_TRAINING_TAG] == "RuntimeError: the probe ran out of memory"


def test_demo_refuses_an_override_typo_before_extracting_and_names_a_bad_archive(tmp_path, capsys, monkeypatch):
    """A typo in the demo's overrides surfaced only after a minute of extracting and converting 60k
    images; a file that is not a tar archive gave tarfile's traceback and left a folder behind."""
    from sslray import demo

    monkeypatch.setattr(demo, "prepare", lambda *a, **k: pytest.fail("the archive was extracted"))
    assert main(["demo", "--data-dir", str(tmp_path / "dd"), "optim.bas_lr=1"]) == 2
    assert "unknown config key(s) optim.bas_lr" in capsys.readouterr().err
    monkeypatch.undo()
    png = tmp_path / "pic.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    assert main(["demo", "--archive", str(png), "--data-dir", str(tmp_path / "dd")]) == 2
    assert f"--archive {png} is not a tar archive" in capsys.readouterr().err
    assert not (tmp_path / "dd" / "cifar10").exists()


@pytest.mark.parametrize("argv, flag", [
    (["probe", "--checkpoint", "c", "--train", "t", "--val", "v", "--train-subset", "-5"], "--train-subset"),
    (["probe", "--checkpoint", "c", "--train", "t", "--val", "v", "-k", "0"], "-k"),
    (["eval", "--checkpoint", "c", "--protocol", "knn", "--val-subset", "-1"], "--val-subset"),
])
def test_negative_image_counts_are_refused_by_flag(argv, flag, capsys):
    """--train-subset -5 reached numpy ("negative dimensions are not allowed"); -k 0 failed after extraction."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and f"argument {flag}: must be at least" in capsys.readouterr().err


def test_tracking_uris_that_name_one_store_are_one_store(tmp_path):
    from sslray.tracking import local_store, same_store

    assert local_store(f"sqlite:///{tmp_path}/m.db?timeout=60") == f"{tmp_path}/m.db"
    assert same_store(str(tmp_path / "mlruns"), f"file://{tmp_path}/mlruns/")
    assert same_store("http://head:5000/", "http://head:5000")
    assert not same_store(f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db")
    assert local_store("databricks") is None and local_store("http://head:5000") is None


def test_an_unreachable_store_is_not_called_a_missing_run(monkeypatch):
    from mlflow.exceptions import MlflowException

    from sslray import tracking

    class Down:
        def get_run(self, run_id):
            raise MlflowException("API request to http://head:5000 failed: Connection refused")

    monkeypatch.setattr(tracking, "_client", lambda uri: Down())
    with pytest.raises(ValueError, match="the MLflow store http://head:5000 could not be read .*Connection refused"):
        tracking.existing_run("http://head:5000", "abc")


def test_auto_batch_leaves_the_batch_to_the_loop(tiny_betons, no_ray):
    """Under data.auto_batch the workers pick the batch (halving, or the checkpoint's on a resume): the
    check before Ray must not refuse the configured one."""
    from sslray.raytrain.trainer import check_data

    cfg = load_config("smoke", [f"data.train={tiny_betons['train']}", f"data.val={tiny_betons['val']}",
                                "data.batch_size=128"])
    with pytest.raises(ValueError, match="data.batch_size 128 is larger"):
        check_data(cfg)
    check_data(cfg.replace(**{"data.auto_batch": True}))


def test_a_studys_use_gpu_override_wins_over_the_counted_gpus(tiny_betons, tmp_path, no_ray, monkeypatch):
    from sslray import study

    seen = {}

    def capture(cfgs, *a, **k):  # the cells' configs, then stop: nothing is written or run
        seen.update(cfgs)
        raise SystemExit(0)

    monkeypatch.setattr(study, "make_study_spec", capture)
    with pytest.raises(SystemExit):
        main(["study", "--methods", "simclr", "--views", "default", "--data", tiny_betons["train"], "--val",
              tiny_betons["val"], "--epochs", "1", "--name", "st", "--storage", str(tmp_path), "--batch-size", "32",
              "--gpus-per-worker", "0", "ray.use_gpu=true"])
    assert seen["simclr"].ray.use_gpu == "true"


def test_a_sigint_taken_by_another_handler_is_still_seen_and_the_handler_put_back():
    """Ctrl-C during fit(): Ray Train's own SIGINT handler takes it and aborts the run, so fit() raised
    an abort or worker error and the run was called failed (exit 1, MLflow FAILED). The signal is seen
    whatever handler took it, and the handler from before is back afterwards (Ray leaves its own)."""
    import os
    import signal

    from sslray.raytrain.trainer import sigint_seen

    before = signal.getsignal(signal.SIGINT)
    took = []
    with sigint_seen() as interrupted:
        assert not interrupted()
        signal.signal(signal.SIGINT, lambda signum, frame: took.append(signum))  # as Ray's fit() does
        os.kill(os.getpid(), signal.SIGINT)
        assert took == [signal.SIGINT] and interrupted()
    assert interrupted() and signal.getsignal(signal.SIGINT) is before
    with sigint_seen() as quiet:
        pass
    assert not quiet()


def test_the_command_of_a_finished_run_says_it_is_complete_before_ray(tiny_betons, tmp_path, no_ray, capsys,
                                                                       monkeypatch):
    """The same command again after the run ended (a notebook cell re-run, a changed lr) started Ray,
    trained nothing, stamped the changed lr on the run and said "finished": it is refused before Ray,
    with the ways on; a run with epochs left (or --restart) goes on to training."""
    import json

    from sslray.raytrain import trainer

    run = tmp_path / "runs" / "done"
    for ck in ("epoch_0001", "epoch_0002.500000_step_0000005", "epoch_0002"):
        (run / ck).mkdir(parents=True)
        (run / ck / "state.pt").write_bytes(b"x")
    (run / "sslray_run.json").write_text(json.dumps({"run_id": "r1", "tracking_uri": "sqlite:///x.db",
                                                      "name": "done"}))
    base = ["pretrain", "--recipe", "smoke", "--data", tiny_betons["train"], "--val", tiny_betons["val"],
            "--name", "done", "--storage", str(tmp_path / "runs"), "--no-probe"]
    assert main(base + ["--epochs", "2", "data.batch_size=8", "optim.base_lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "run done is already complete (2/2 epochs" in err and "--restart" in err and "--epochs above 2" in err, err

    started = []
    monkeypatch.setattr(trainer, "pretrain", lambda cfg, **k: started.append(cfg.train.epochs) or pytest.skip("ok"))
    import sslray.raytrain.runfolder as T

    assert T.completed_epochs(str(run)) == 2
    (run / "epoch_0002" / "state.pt").unlink()  # the newest is then mid-epoch 3: 2 epochs done
    assert T.completed_epochs(str(run)) == 2 and T.completed_epochs(str(tmp_path / "none")) is None
    with pytest.raises(pytest.skip.Exception):
        main(base + ["--epochs", "3", "data.batch_size=8"])
    assert started == [3]


def test_train_wall_seconds_adds_up_the_segments_of_a_resumed_run(tmp_path):
    """A run interrupted after 50 s and resumed for 34 s showed 34 s in `sslray compare`: each fit()
    logged its own time. The metric is the sum of every segment, the interrupted one included."""
    from sslray.raytrain.trainer import log_wall_seconds

    t = Tracker.start(f"sqlite:///{tmp_path / 'm.db'}", "e", "r")
    log_wall_seconds(t, 50.0)
    log_wall_seconds(t, 34.0)
    assert t.client.get_run(t.run_id).data.metrics["train_wall_seconds"] == pytest.approx(84.0)


def test_subsets_larger_than_the_data_are_said_once(tiny_betons):
    """The CPU demo recipe asks for 8,000 training images: on a 1,500-image .beton all were used without
    a word while MLflow recorded 8000. The plan says so (the loop logs it on rank 0)."""
    from sslray.raytrain.data import plan_data

    cfg = load_config("smoke", [f"data.train={tiny_betons['train']}", f"data.val={tiny_betons['val']}",
                                "data.batch_size=8", "data.train_subset=100", "data.val_subset=5", "data.knn_bank=500"])
    assert plan_data(cfg, 1).notes(cfg.data) == [
        "data.train_subset 100 is more than the 64 images there: all 64 are used",
        "data.knn_bank 500 is more than the 64 images there: all 64 are used"]  # val_subset 5 of 8 fits
    more_val = cfg.replace(**{"data.val_subset": 9})
    notes = plan_data(more_val, 1).notes(more_val.data)
    assert "data.val_subset 9 is more than the 8 images there: all 8 are used" in notes
    fits = cfg.replace(**{"data.train_subset": 32, "data.val_subset": 4, "data.knn_bank": 0})
    assert plan_data(fits, 1).notes(fits.data) == []
