"""Runs whose storage is object storage (``--storage s3://...``), against a local S3 (moto's server):
everything that reads a checkpoint after training (probe, eval, export, load, --init-weights) takes
an ``s3://`` location, copies only the checkpoint it needs into the local cache once, and the export
at the end of ``sslray pretrain`` lands beside the checkpoints on S3. The Ray test trains on S3,
probes, exports and then resumes from the S3 checkpoint in a second invocation."""

from __future__ import annotations

import json
import os
import re
import types
from pathlib import Path

import pytest
import torch

from sslray import storage
from sslray.cli import main
from sslray.export import META, WEIGHTS, export_after_training, export_backbone, load_backbone, read_weights
from sslray.raytrain import runfolder
from sslray.raytrain.evaluate import find_state, load_checkpoint

from test_export import SMALL, _checkpoint, _same_features


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _put(uri: str, data: bytes) -> None:
    fs, path = storage.filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def _upload_tree(local: Path, uri: str) -> None:
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.upload(f, storage.join(uri, *f.relative_to(local).parts))


def test_the_newest_checkpoint_is_fetched_once_with_its_run_file(s3_server, cache):
    run = s3_server.bucket("fetch") + "/runs/r1"
    _put(f"{run}/epoch_0001/state.pt", b"old" * 10)
    _put(f"{run}/epoch_0002/state.pt", b"new" * 20)
    _put(f"{run}/epoch_0002/extra.bin", b"x")
    _put(f"{run}/sslray_run.json", json.dumps({"run_id": "abc", "tracking_uri": "sqlite:///m.db"}).encode())

    local = find_state(run)  # a run folder: its newest checkpoint
    assert local == cache / "remote" / "s3" / "fetch" / "runs" / "r1" / "epoch_0002" / "state.pt"
    assert local.read_bytes() == b"new" * 20 and (local.parent / "extra.bin").read_bytes() == b"x"
    assert not (local.parent.parent / "epoch_0001").exists()  # only the checkpoint it needs
    assert json.loads((local.parent.parent / "sslray_run.json").read_text())["run_id"] == "abc"
    assert storage.remote_source(local) == f"{run}/epoch_0002/state.pt"
    assert storage.remote_source(Path("/elsewhere/state.pt")) is None

    from sslray.eval.runner import find_run

    assert find_run(run)["run_id"] == "abc"  # `sslray eval` still logs to the pretraining run

    stamp = local.stat().st_ino  # a fetch writes a new file and renames it over the copy
    assert find_state(f"{run}/epoch_0002") == local and local.stat().st_ino == stamp  # not fetched again
    _put(f"{run}/epoch_0002/state.pt", b"changed" * 30)  # a rewritten checkpoint is fetched again
    assert find_state(f"{run}/epoch_0002/state.pt").read_bytes() == b"changed" * 30
    assert not list(cache.rglob("*.part"))  # no temporary file left behind

    # A newer checkpoint replaces the cached copy of the older one; asking for the older one by name
    # fetches it again and leaves the newer copy alone.
    _put(f"{run}/epoch_0003/state.pt", b"newer" * 20)
    newer = find_state(run)
    assert newer.parent.name == "epoch_0003" and not local.parent.exists()
    assert find_state(f"{run}/epoch_0002").read_bytes() == b"changed" * 30 and newer.exists()


def _rewrite_in_a_later_second(uri: str, data: bytes) -> None:
    """Write ``data`` over ``uri`` until the server reports a newer mtime (S3 keeps it to the second)."""
    import time

    fs, path = storage.filesystem(uri)
    before, deadline = fs.get_file_info(path).mtime_ns, time.monotonic() + 10
    while True:
        _put(uri, data)
        if fs.get_file_info(path).mtime_ns != before:
            return
        assert time.monotonic() < deadline, f"{uri}: the server kept reporting the same mtime"
        time.sleep(0.05)


def test_a_rewrite_of_the_same_size_is_fetched_again(s3_server, cache):
    """A checkpoint saved again after ``--restart`` and the run's new ``sslray_run.json`` keep their
    sizes: the cached copies follow the remote's mtime, not only its size."""
    run = s3_server.bucket("rewrite") + "/runs/r1"
    _put(f"{run}/epoch_0002/state.pt", b"a" * 100)
    _put(f"{run}/sslray_run.json", json.dumps({"run_id": "1" * 32}).encode())
    local = find_state(run)
    fs, path = storage.filesystem(f"{run}/epoch_0002/state.pt")
    assert local.stat().st_mtime_ns == fs.get_file_info(path).mtime_ns  # the copy carries the remote's mtime
    stamp = local.stat().st_ino
    assert find_state(run).stat().st_ino == stamp  # unchanged: the copy is used again

    _rewrite_in_a_later_second(f"{run}/epoch_0002/state.pt", b"b" * 100)
    _rewrite_in_a_later_second(f"{run}/sslray_run.json", json.dumps({"run_id": "2" * 32}).encode())
    assert find_state(run).read_bytes() == b"b" * 100
    assert json.loads((local.parent.parent / "sslray_run.json").read_text())["run_id"] == "2" * 32
    assert not list(cache.rglob("*.part"))


def test_a_copy_is_trusted_only_with_the_remotes_size_and_mtime(cache, tmp_path, monkeypatch):
    """Through a ``file://`` location (the same pyarrow path as ``s3://``) with mtimes set exactly: a
    same-size rewrite one nanosecond later is fetched again, and a filesystem that reports no mtime
    gets no trust at all."""
    import os

    import pyarrow.fs as pafs

    remote = tmp_path / "bucket" / "backbone" / "backbone.json"
    remote.parent.mkdir(parents=True)
    remote.write_bytes(b'{"epoch": 5}')
    os.utime(remote, ns=(10**18, 10**18))
    uri = f"file://{remote}"
    local = storage.fetch(uri)
    assert local.read_bytes() == b'{"epoch": 5}' and local.stat().st_mtime_ns == 10**18
    stamp = local.stat().st_ino
    assert storage.fetch(uri).stat().st_ino == stamp

    remote.write_bytes(b'{"epoch": 7}')
    os.utime(remote, ns=(10**18 + 1, 10**18 + 1))
    assert storage.fetch(uri).read_bytes() == b'{"epoch": 7}'
    assert storage.fetch(f"file://{remote.parent}") / "backbone.json" == local  # a folder takes the same path
    assert local.stat().st_mtime_ns == 10**18 + 1

    real_filesystem = storage.filesystem

    class NoMtimes:
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def get_file_info(self, what):
            def strip(i):
                return pafs.FileInfo(i.path, i.type, size=i.size)

            got = self.fs.get_file_info(what)
            return [strip(i) for i in got] if isinstance(got, list) else strip(got)

    monkeypatch.setattr(storage, "filesystem", lambda loc: (NoMtimes(real_filesystem(loc)[0]),
                                                            real_filesystem(loc)[1]))
    stamp = local.stat().st_ino
    assert storage.fetch(uri).read_bytes() == b'{"epoch": 7}' and local.stat().st_ino != stamp


def test_missing_locations_are_named(s3_server, cache):
    root = s3_server.bucket("missing")
    with pytest.raises(FileNotFoundError, match=f"{root}/nothing/here not found"):
        find_state(f"{root}/nothing/here")
    _put(f"{root}/run/notes.txt", b"no checkpoint")
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint \(state.pt\) under {root}/run"):
        find_state(f"{root}/run")
    with pytest.raises(FileNotFoundError, match=f"model.init_weights: {root}/gone not found"):
        read_weights(f"{root}/gone")


def test_restart_on_s3_moves_the_old_run_aside_whole(s3_server, monkeypatch):
    """``--restart`` with bucket storage: every file of the old run lands under ``<name>.old-<time>``
    with its bytes, nothing stays at the run's name (so the next run starts fresh), and a copy that
    does not arrive whole keeps the originals."""
    from sslray.config import load_config

    root = s3_server.bucket("restart") + "/runs"
    files = {"sslray_run.json": json.dumps({"run_id": "old"}).encode(), "epoch_0001/state.pt": b"a" * 100,
             "epoch_0002/state.pt": b"b" * 200, "pictures/views.png": b"png"}
    for name, data in files.items():
        _put(f"{root}/r1/{name}", data)
    _put(f"{root}/r10/sslray_run.json", b"{}")  # a run whose name starts with the same letters stays put
    cfg = load_config("smoke", {"ray.name": "r1", "ray.storage": root})
    assert runfolder.resumes(cfg) and not runfolder.resumes(cfg, restart=True)

    old = runfolder.move_aside(f"{root}/r1")
    assert old.startswith(f"{root}/r1.old-")
    for name, data in files.items():
        assert storage.read_text(f"{old}/{name}") == data.decode()
    assert not storage.exists(f"{root}/r1") and not runfolder.resumes(cfg)
    assert storage.exists(f"{root}/r10/sslray_run.json")
    assert runfolder.move_aside(f"{root}/r1") is None  # nothing there: nothing to move

    # A copy that comes out short: the originals stay where they were.
    _put(f"{root}/r2/epoch_0001/state.pt", b"c" * 50)
    real_filesystem = storage.filesystem

    class ShortCopies:
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def copy_file(self, src, dest):
            with self.fs.open_output_stream(dest) as f:
                f.write(b"c")

    monkeypatch.setattr(storage, "filesystem", lambda loc: (ShortCopies(real_filesystem(loc)[0]),
                                                            real_filesystem(loc)[1]))
    with pytest.raises(OSError, match=r"epoch_0001/state.pt was not copied whole \(1 of 50 bytes\); "
                                      r"the originals are kept"):
        runfolder.move_aside(f"{root}/r2")
    assert storage.read_text(f"{root}/r2/epoch_0001/state.pt") == "c" * 50


def test_gcs_run_folder_probe_export_and_restart(gcs, cache, tmp_path, capsys):
    """The same paths on Google Cloud Storage (a local emulator): a real checkpoint's run folder on
    ``gs://`` is fetched (newest checkpoint and run file only), exported to ``gs://`` and loaded from
    there with equal tensors, the older cached copy is dropped when a newer checkpoint appears, and
    ``--restart`` moves the run aside whole."""
    over = {**SMALL, "model.backbone": "resnet10t"}
    model, ckpt = _checkpoint(tmp_path / "local", "simclr_cifar10", over, epoch=2)
    (ckpt.parent / "sslray_run.json").write_text(json.dumps({"run_id": "gcs-run"}))
    run = gcs.bucket("gbkt") + "/runs/r1"
    _upload_tree(ckpt.parent, run)
    _put(f"{run}/epoch_0001/state.pt", b"older")

    local = find_state(run)
    assert local == cache / "remote" / "gs" / "gbkt" / "runs" / "r1" / "epoch_0002" / "state.pt"
    assert not (local.parent.parent / "epoch_0001").exists()
    assert json.loads((local.parent.parent / "sslray_run.json").read_text())["run_id"] == "gcs-run"

    out = "gs://gbkt/models/m1"
    assert main(["export", run, out]) == 0 and f"-> {out}/{WEIGHTS}" in capsys.readouterr().out
    _same_features(load_backbone(out)[0], model.backbone)
    assert main(["export", run, out]) == 2 and "--force" in capsys.readouterr().err

    _upload_tree(ckpt, f"{run}/epoch_0003")
    assert find_state(run).parent.name == "epoch_0003" and not local.exists()

    before = _tree(run)
    assert {"sslray_run.json", "epoch_0001/state.pt", "epoch_0003/state.pt", f"backbone/{WEIGHTS}"} <= set(before) \
        or {"sslray_run.json", "epoch_0001/state.pt", "epoch_0003/state.pt"} <= set(before)
    old = runfolder.move_aside(run)
    assert old.startswith(f"{run}.old-") and not storage.exists(run) and _tree(old) == before


def _tree(uri: str) -> dict[str, int]:
    """Every file under a location, relative path -> size."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(uri)
    return {f.path[len(path) + 1:]: f.size for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if f.type == pafs.FileType.File}


def test_checkpoint_uri_gives_back_the_scheme_pyarrow_drops():
    class Ckpt:
        path = "bucket/runs/x/epoch_0002"

    assert storage.checkpoint_uri(Ckpt(), "s3://bucket/runs") == "s3://bucket/runs/x/epoch_0002"
    assert storage.checkpoint_uri(Ckpt(), "gs://bucket/runs") == "gs://bucket/runs/x/epoch_0002"
    Ckpt.path = "/abs/runs/x/epoch_0002"
    assert storage.checkpoint_uri(Ckpt(), "/abs/runs") == "/abs/runs/x/epoch_0002"
    assert storage.checkpoint_uri(None, "s3://bucket") is None


def test_export_load_and_init_weights_from_s3(s3_server, cache, tmp_path, capsys):
    over = {**SMALL, "model.backbone": "resnet18", "model.cifar_stem": True}
    model, ckpt = _checkpoint(tmp_path / "local", "simclr_cifar10", over, epoch=2)
    run = s3_server.bucket("export") + "/runs/r1"
    _upload_tree(ckpt.parent, run)

    assert main(["export", run, str(tmp_path / "out")]) == 0  # the CLI takes the run's URI
    assert "sslray export: simclr student backbone resnet18 (epoch 2" in capsys.readouterr().out
    loaded, meta = load_backbone(tmp_path / "out")
    _same_features(loaded, model.backbone)
    assert meta["checkpoint"] == f"{run}/epoch_0002/state.pt"  # where it came from, not the cache

    class Tracker:
        logged: list = []

        def log_artifact(self, path, subdir=None):
            self.logged.append((Path(path).name, subdir))

    lines = []
    assert export_after_training(f"{run}/epoch_0002", Tracker(), log=lines.append) == f"{run}/backbone"
    assert Tracker.logged == [(WEIGHTS, "backbone"), (META, "backbone")]
    assert f"backbone exported to {run}/backbone" in lines[-1]
    fs, path = storage.filesystem(f"{run}/backbone")
    import pyarrow.fs as pafs

    assert sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path))) == sorted([WEIGHTS, META])
    assert not [i for i in fs.get_file_info(pafs.FileSelector(path)) if ".part" in i.base_name]

    # ... and loads straight from S3, as a folder or as its weights file; --init-weights takes it too.
    _same_features(load_backbone(f"{run}/backbone")[0], model.backbone)
    _same_features(load_backbone(f"{run}/backbone/{WEIGHTS}")[0], model.backbone)
    sd, _ = read_weights(f"{run}/backbone")
    torch.testing.assert_close(sd, model.backbone.state_dict(), rtol=0, atol=0)
    cfg, reloaded, _ = load_checkpoint(run, torch.device("cpu"))
    assert cfg.model.cifar_stem and reloaded.backbone.conv1.kernel_size == (3, 3)

    # An export straight to the bucket: never over an earlier one without --force.
    models = run.replace("/runs/r1", "/models/m1")
    assert main(["export", run, models]) == 0
    assert f"-> {models}/{WEIGHTS}" in capsys.readouterr().out
    _same_features(load_backbone(models)[0], model.backbone)
    assert main(["export", run, models]) == 2
    err = capsys.readouterr().err
    assert f"{models}/{WEIGHTS}" in err and "--force" in err
    assert main(["export", run, models, "--force"]) == 0

    # The local export from the same checkpoint holds exactly the same tensors.
    from safetensors.torch import load_file

    export_backbone(ckpt, tmp_path / "local_out")
    torch.testing.assert_close(load_file(tmp_path / "local_out" / WEIGHTS), load_file(tmp_path / "out" / WEIGHTS),
                               rtol=0, atol=0)


@pytest.mark.ray
@pytest.mark.slow
def test_pretrain_on_s3_probes_exports_and_resumes(ray_cluster, s3_server, cifar_small, cache, tmp_path, monkeypatch,
                                                   capsys):
    """`sslray pretrain --storage s3://...` with 2 Ray workers: the checkpoints, run file and pictures
    land on S3 and the backbone export beside them; running the same name again with more epochs
    continues from the S3 checkpoint into the same MLflow run, and its probe reads the S3 checkpoint."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    runs = s3_server.bucket("pretrain") + "/runs"
    args = ["pretrain", "--recipe", "smoke", "--data", cifar_small["train"], "--val", cifar_small["test"],
            "--workers", "2", "--experiment", "s3", "--name", "s3-run", "--storage", runs]
    assert main([*args, "--epochs", "1", "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {runs}/s3-run/epoch_0001" in out
    assert f"backbone exported to {runs}/s3-run/backbone" in out
    assert not (tmp_path / "runs").exists()  # nothing went to the local default storage

    import pyarrow.fs as pafs

    fs, path = storage.filesystem(f"{runs}/s3-run")
    names = {str(Path(i.path).relative_to(path)) for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))}
    assert {"epoch_0001/state.pt", "sslray_run.json", "backbone/backbone.safetensors", "pictures/views.png"} <= names

    assert main([*args, "--epochs", "2"]) == 0  # the same name again: resumes from S3
    out = capsys.readouterr().out
    assert "resuming run s3-run" in out and f"checkpoint {runs}/s3-run/epoch_0002" in out
    assert "pretrained" in out and "random init" in out  # the probe read the S3 checkpoint

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("s3").experiment_id])
    assert run.data.tags["sslray.checkpoint"] == f"{runs}/s3-run/epoch_0002"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert "probe_linear_top1" in run.data.metrics
    meta = json.loads(Path(client.download_artifacts(run.info.run_id, "backbone/backbone.json", str(tmp_path)))
                      .read_text())
    assert (meta["epoch"], meta["checkpoint"]) == (2, f"{runs}/s3-run/epoch_0002/state.pt")


def test_uri_special_characters_in_a_remote_run_name_are_refused_before_anything_moves(tmp_path, monkeypatch):
    """pyarrow reads '#' as a fragment: `s3://b/runs/r#1` would be `b/runs/r` to sslray, `r#1` to Ray Train."""
    from sslray.config import load_config
    from sslray.raytrain import trainer as T

    moved = []
    monkeypatch.setattr(T, "move_aside", lambda run_dir: moved.append(run_dir))
    for name, shown in (("r#1", "'#'"), ("my run", "a space"), ("r?x=1", "'?'"), ("r%41", "'%'")):
        cfg = load_config("smoke", [f"ray.name={name}", "ray.storage=s3://bkt/runs", "data.train=/d/x.beton"])
        with pytest.raises(T.StorageError, match=f"ray.name \\(--name\\) '{re.escape(name)}' holds {shown}"):
            T.pretrain(cfg, restart=True)
    assert not moved
    with pytest.raises(T.StorageError, match="ray.storage"):
        T.check_remote_name("gs://bkt/my runs", "r1")
    T.check_remote_name(str(tmp_path / "my #runs"), "r#1")  # a local folder takes any name
    cfg = load_config("smoke", ["data.train=/data/my set/cifar train.beton"])
    assert " " not in runfolder.run_name(cfg) and "cifar_train" in runfolder.run_name(cfg)


def test_move_tree_refuses_to_move_a_folder_onto_or_into_itself(tmp_path):
    from sslray.storage import move_tree

    run = tmp_path / "runs" / "r"
    (run / "epoch_0001").mkdir(parents=True)
    (run / "epoch_0001" / "state.pt").write_bytes(b"x" * 10)
    for dest in (run, run / "old"):
        with pytest.raises(OSError, match="the destination is the folder itself or inside it"):
            move_tree(run.as_uri(), dest.as_uri())
    assert (run / "epoch_0001" / "state.pt").read_bytes() == b"x" * 10


def test_move_tree_keeps_a_file_written_during_the_move_and_never_merges_into_an_existing_folder(tmp_path,
                                                                                                    monkeypatch,
                                                                                                    capsys):
    """--restart while the old job still writes: what it wrote after the listing is not deleted uncopied."""
    from sslray.storage import move_tree

    run = tmp_path / "runs" / "r"
    (run / "epoch_0001").mkdir(parents=True)
    (run / "epoch_0001" / "state.pt").write_bytes(b"x" * 10)
    (tmp_path / "runs" / "taken").mkdir()
    with pytest.raises(OSError, match="taken already exists; nothing was moved"):
        move_tree(run.as_uri(), (tmp_path / "runs" / "taken").as_uri())

    real = storage.filesystem

    class LateWriter:  # the first copy is when the still-running job writes its next checkpoint
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def copy_file(self, src, dest):
            self.fs.copy_file(src, dest)
            (run / "epoch_0002").mkdir(exist_ok=True)
            (run / "epoch_0002" / "state.pt").write_bytes(b"y" * 10)

    monkeypatch.setattr(storage, "filesystem", lambda loc: (LateWriter(real(loc)[0]), real(loc)[1]))
    assert move_tree(run.as_uri(), (tmp_path / "runs" / "old").as_uri())
    assert (tmp_path / "runs" / "old" / "epoch_0001" / "state.pt").read_bytes() == b"x" * 10
    assert (run / "epoch_0002" / "state.pt").read_bytes() == b"y" * 10
    assert not (run / "epoch_0001" / "state.pt").exists()
    assert "1 file(s) appeared under" in capsys.readouterr().out


def test_a_restart_that_cannot_move_the_old_run_is_a_storage_error(tmp_path, monkeypatch, capsys, tiny_betons):
    from sslray.cli import main
    from sslray.raytrain import trainer

    def unreachable(run_dir):
        raise OSError("When listing objects under key 'runs/r1': AWS Error NETWORK_CONNECTION")

    monkeypatch.setattr(trainer, "move_aside", unreachable)
    rc = main(["pretrain", "--recipe", "smoke", "--data", tiny_betons["train"], "--name", "r1", "--storage",
               "s3://bkt/runs", "--restart"])  # the data check comes first
    err = capsys.readouterr().err
    assert rc == 2 and "--restart: the previous run in s3://bkt/runs/r1 could not be moved aside" in err
    assert "NETWORK_CONNECTION" in err and "nothing was deleted" in err


def test_a_restart_with_a_mistyped_dataset_moves_nothing_aside(tmp_path, capsys, monkeypatch):
    import ray

    from sslray.cli import main

    # where sslray starts its own Ray (the workers run here); on a joined cluster a path missing here is
    # only a note, since the workers may have it
    from sslray.raytrain import trainer

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(trainer, "local_head", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    old = tmp_path / "runs" / "r1"
    old.mkdir(parents=True)
    (old / "sslray_run.json").write_text("{}")
    rc = main(["pretrain", "--recipe", "smoke", "--data", str(tmp_path / "trian.beton"), "--name", "r1", "--storage",
               str(tmp_path / "runs"), "--restart"])
    assert rc == 2 and "trian.beton: no such file" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r1"] and (old / "sslray_run.json").exists()


@pytest.mark.parametrize("key, value, named", [
    ("method.params.temprature", "0.1", "method.params.temprature for method 'simclr'"),
    ("views.backend", "kornai", "config key 'views.backend': unknown view backend 'kornai'"),
    ("views.preset", "simclrr", "config key 'views.preset': unknown view preset 'simclrr'"),
    ("optim.name", "adam", "config key 'optim.name': unknown optimizer 'adam'"),
    ("method.name", "simclrr", "config key 'method.name': unknown method 'simclrr'"),
])
def test_a_key_the_workers_would_refuse_fails_before_ray_and_moves_nothing(tmp_path, capsys, monkeypatch, key, value,
                                                                        named, tiny_betons):
    from sslray.cli import main
    from sslray.raytrain import trainer

    monkeypatch.setattr(trainer, "ensure_ray", lambda: pytest.fail("Ray was started"))
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    rc = main(["pretrain", "--recipe", "smoke", "--data", tiny_betons["train"], "--name", "r1", "--storage",
               str(tmp_path / "runs"), "--restart", f"{key}={value}"])
    assert rc == 2 and named in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r1"]


def test_a_resume_with_other_settings_says_so_in_the_mlflow_run(tmp_path, capsys):
    from sslray.config import flatten, load_config
    from sslray.raytrain.trainer import log_resumed_config
    from sslray.tracking import Tracker

    first = load_config("smoke", ["ray.name=", "train.epochs=1"])
    tracker = Tracker.start(f"sqlite:///{tmp_path / 'mlflow.db'}", "e", "r1")
    tracker.log_params(flatten(first))
    assert log_resumed_config(tracker, first.replace(**{"ray.name": "r1"})) == {}  # the name is no change
    resumed = first.replace(**{"ray.name": "r1", "train.epochs": 2, "data.batch_size": 16})
    assert log_resumed_config(tracker, resumed) == {"train.epochs": ("2", "1"), "data.batch_size": ("16", "32")}
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.tags["sslray.resumed_with"] == "data.batch_size=16 (was 32); train.epochs=2 (was 1)"
    assert run.data.params["train.epochs"] == "1"  # params stay as first logged (MLflow cannot change them)
    arts = [a.path for a in tracker.client.list_artifacts(tracker.run_id)]
    assert any(a.startswith("config-resume-") and a.endswith(".yaml") for a in arts), arts
    assert "resumed with other settings" in capsys.readouterr().out


def test_two_restarts_within_a_second_keep_both_old_runs(tmp_path, monkeypatch):
    from sslray.raytrain import trainer

    monkeypatch.setattr(trainer.time, "strftime", lambda fmt: "20261124-120000")
    olds = []
    for data in (b"first", b"second"):
        (tmp_path / "r1").mkdir()
        (tmp_path / "r1" / "state.pt").write_bytes(data)
        olds.append(runfolder.move_aside(str(tmp_path / "r1")))
    assert olds == [f"{tmp_path}/r1.old-20261124-120000", f"{tmp_path}/r1.old-20261124-120000-2"]
    assert [Path(o, "state.pt").read_bytes() for o in olds] == [b"first", b"second"]


def test_a_broken_run_file_is_named_and_the_run_file_is_written_whole(tmp_path, monkeypatch):
    from sslray.config import load_config
    from sslray.raytrain import runfolder as T
    from sslray.storage import read_text, write_text

    cfg = load_config("smoke", ["ray.name=r1", f"ray.storage={tmp_path / 'runs'}"])
    run_file = tmp_path / "runs" / "r1" / "sslray_run.json"
    write_text(str(run_file), '{"run_id": "abc"}')
    assert T.resumes(cfg) and sorted(p.name for p in run_file.parent.iterdir()) == ["sslray_run.json"]
    run_file.write_text("")  # a kill between open and write, before writes went through a temp name
    with pytest.raises(T.StorageError, match=f"{re.escape(str(run_file))} is not valid JSON.*--restart"):
        T.resumes(cfg)
    assert read_text(str(tmp_path / "nothing.json")) is None


def test_a_tilde_in_storage_is_the_home_folder(tmp_path, monkeypatch):
    from sslray.config import load_config
    from sslray.raytrain.runfolder import run_location
    from sslray.storage import absolute

    monkeypatch.setenv("HOME", str(tmp_path))
    assert run_location(load_config("smoke", ["ray.name=r1", "ray.storage=~/runs"]))[2] == f"{tmp_path}/runs/r1"
    assert absolute("~/data/train.beton") == f"{tmp_path}/data/train.beton"


def test_newest_file_takes_a_local_folder_too(tmp_path):
    from sslray.storage import newest_file

    for name in ("epoch_0001", "epoch_0002"):
        (tmp_path / "run" / name).mkdir(parents=True)
        (tmp_path / "run" / name / "state.pt").write_bytes(b"x")
    assert newest_file(str(tmp_path / "run"), "state.pt") == str(tmp_path / "run" / "epoch_0002" / "state.pt")


def test_a_run_that_cannot_start_ray_leaves_no_empty_run_folder(tmp_path, capsys, monkeypatch, tiny_betons):
    """Ray (or MLflow) failing after the storage check left an empty <storage>/<name> behind; a run
    folder that was there before (a resume) stays."""
    from sslray.cli import main
    from sslray.raytrain import trainer

    def no_ray():
        raise ConnectionError("no Ray cluster at ray://head:10001")

    monkeypatch.setattr(trainer, "ensure_ray", no_ray)
    args = ["pretrain", "--recipe", "smoke", "--data", tiny_betons["train"], "--storage", str(tmp_path / "runs")]
    with pytest.raises(ConnectionError, match="ray://head"):
        main([*args, "--name", "fresh"])
    assert not (tmp_path / "runs" / "fresh").exists()
    (tmp_path / "runs" / "kept").mkdir()
    with pytest.raises(ConnectionError):
        main([*args, "--name", "kept"])
    assert (tmp_path / "runs" / "kept").is_dir()


@pytest.fixture(scope="module")
def other_betons(tmp_path_factory, tiny_betons) -> dict:
    """Beside tiny_betons: a val split with other classes, an unlabelled one, and a PNG."""
    from PIL import Image

    from sslray.datasets import WriteParams, convert

    root = tmp_path_factory.mktemp("other_betons")
    for cls in ("bird", "frog"):
        (root / "src" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i, 9 * i, 200)).save(root / "src" / cls / f"{i}.png")
    out = {"pic": str(root / "src" / "bird" / "0.png")}
    for name, source in (("birds", "imagefolder"), ("unlabelled", "unlabelled")):
        out[name] = str(root / f"{name}.beton")
        convert(root / "src", out[name], source=source, params=WriteParams(max_resolution=8), workers=1, verbose=False)
    return {**tiny_betons, **out}


@pytest.mark.parametrize("data, val, extra, named", [
    ("pic", "val", [], "bird/0.png is not a readable .beton"),
    ("train", "birds", [], "only in train: cat, dog; only in val: bird, frog"),
    ("unlabelled", "val", [], "data.train=.*unlabelled.beton has no class labels, but a val split is given"),
    ("train", "unlabelled", [], "data.val=.*unlabelled.beton has no class labels"),
    ("train", "val", ["--batch-size", "128"], "data.batch_size 128 is larger than the 64 training images allow"),
    ("train", "val", ["--batch-size", "33"], "'data.batch_size' \\(33\\) must divide evenly over 2 workers"),
    ("train", "val", ["--backbone", "resnet81"], "unknown backbone 'resnet81'.*did you mean .*resnet18"),
])
def test_what_the_workers_would_refuse_in_the_data_fails_before_ray_and_keeps_the_old_run(
        tmp_path, capsys, no_ray, other_betons, data, val, extra, named):
    """The workers read the data's headers ~80 s after Ray started; a --restart had moved the old run
    aside by then. The same checks now run first (a fresh CLI: no Ray in this process)."""
    from sslray.cli import main
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    rc = main(["pretrain", "--recipe", "smoke", "--data", other_betons[data], "--val", other_betons[val],
               "--name", "r1", "--storage", str(tmp_path / "runs"), "--restart", "--workers", "2", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(named, err), err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r1"]


def test_a_resume_with_another_tracking_uri_is_refused_and_keeps_the_link(tmp_path, capsys, monkeypatch, tiny_betons):
    """Resumed from another folder (the default sqlite:///mlflow.db is per folder), the run started a
    second MLflow run and overwrote sslray_run.json, the only link to the first."""
    import json

    from sslray.cli import main
    from sslray.raytrain import trainer

    monkeypatch.setattr(trainer, "ensure_ray", lambda *a, **k: pytest.fail("Ray was started"))
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    team_db = tmp_path / "team" / "mlflow.db"  # the store the run was started with, still there
    team_db.parent.mkdir()
    team_db.write_bytes(b"")
    link = {"run_id": "abc123", "tracking_uri": f"sqlite:///{team_db}", "name": "r1"}
    (run_dir / "sslray_run.json").write_text(json.dumps(link))
    monkeypatch.chdir(tmp_path)
    rc = main(["pretrain", "--recipe", "smoke", "--data", tiny_betons["train"], "--name", "r1", "--storage",
               str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and f"logs to MLflow run abc123 in sqlite:///{team_db}" in err
    assert f"this command's tracking URI is sqlite:///{tmp_path / 'mlflow.db'}" in err
    assert f"--tracking-uri sqlite:///{team_db}" in err
    assert json.loads((run_dir / "sslray_run.json").read_text()) == link and not (tmp_path / "mlflow.db").exists()
    # A store that is gone (a job's temporary working dir) has no run to resume into: a new one, with a warning.
    team_db.unlink()
    monkeypatch.setattr(trainer, "ensure_ray", lambda *a, **k: (_ for _ in ()).throw(SystemExit(7)))
    with pytest.raises(SystemExit):
        main(["pretrain", "--recipe", "smoke", "--data", tiny_betons["train"], "--name", "r1", "--storage",
              str(tmp_path / "runs")])
    assert f"sqlite:///{team_db}, which no longer exists" in capsys.readouterr().out


def test_a_local_storage_other_nodes_cannot_see_is_refused_before_training(tmp_path, monkeypatch):
    """`pretrain` from a cluster's head with a folder of the head as storage: the pre-Ray check wrote
    only there, and the run failed at its first checkpoint, an epoch later, on a worker node."""
    import ray

    import sslray.raytrain.runfolder as T

    cpu = {"CPU": 8.0}
    nodes = [{"NodeID": "a" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": cpu},
             {"NodeID": "b" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": cpu},
             {"NodeID": "c" * 56, "Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": cpu},
             {"NodeID": "d" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.4", "Resources": {}},  # a 0-CPU head
             {"NodeID": "e" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.5", "Resources": cpu}]  # no GPU
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_node_id=lambda: "a" * 56))
    asked = []

    def blind(path, others, timeout):
        asked.append((os.path.exists(path), [n["NodeManagerAddress"] for n in others]))
        return ["10.0.0.2"]

    monkeypatch.setattr(T, "nodes_without", blind)
    with pytest.raises(T.StorageError, match=r"node\(s\) 10\.0\.0\.2 cannot see.*s3://"):
        T.check_storage_on_nodes(str(tmp_path), cpus_per_worker=2)
    assert asked == [(True, ["10.0.0.2", "10.0.0.5"])]  # the other live nodes that can hold a worker
    nodes[1]["Resources"] = {"CPU": 8.0, "GPU": 1.0}
    asked.clear()
    with pytest.raises(T.StorageError):
        T.check_storage_on_nodes(str(tmp_path), cpus_per_worker=2, use_gpu=True)
    assert asked == [(True, ["10.0.0.2"])]  # a GPU job's workers never land on the CPU-only node
    assert not list(tmp_path.iterdir())  # the probe file is removed
    monkeypatch.setattr(T, "nodes_without", lambda *a: [])
    T.check_storage_on_nodes(str(tmp_path))  # a shared mount passes
    T.check_storage_on_nodes("s3://bucket/runs/x")  # a URI is every node's


@pytest.mark.ray
def test_nodes_without_asks_each_node_for_the_file(ray_cluster, tmp_path):
    import ray

    from sslray.raytrain.runfolder import nodes_without

    me = [n for n in ray.nodes() if n["Alive"]]
    (tmp_path / "here").write_text("ok")
    assert nodes_without(str(tmp_path / "here"), me, 60) == []
    assert nodes_without(str(tmp_path / "gone"), me, 60) == [me[0]["NodeManagerAddress"]]
