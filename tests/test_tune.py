"""`sslray tune`: space parsing, lr scaling and trial sizing (fast); real sweeps on a small CIFAR-10
subset through Ray Tune + Ray Train with MLflow parent/child runs, and a killed driver resumed (ray, slow)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest

from sslray.config import ConfigError, effective_lr, load_config
from sslray.raytrain.methods import METHODS
from sslray.tune.space import (
    TEMPERATURE_RANGES,
    Dist,
    check_space,
    default_space,
    parse_dist,
    parse_space,
    trial_config,
)
from sslray.tune.sweep import max_concurrent_trials
from sslray.tune.trial import failure_reason

# --------------------------------------------------------------------------------------------- fast


def test_parse_key_dist_strings_and_aliases():
    space = parse_space(["lr=loguniform(1e-4,1e-1)", "batch_size=choice(64,128)", "temperature=uniform(0.1, 0.5)",
                         "method.params.mask_ratio=grid(0.6,0.75,0.9)", "train.seed=randint(0,10)"])
    assert space == {
        "optim.base_lr": Dist("loguniform", (1e-4, 1e-1)),
        "data.batch_size": Dist("choice", (64, 128)),
        "method.temperature": Dist("uniform", (0.1, 0.5)),
        "method.params.mask_ratio": Dist("grid", (0.6, 0.75, 0.9)),
        "train.seed": Dist("randint", (0, 10)),
    }
    assert str(space["optim.base_lr"]) == "loguniform(0.0001, 0.1)"
    # names as a shell user writes them: unquoted words are strings, numbers stay numbers
    assert parse_space(["views.policy=grid(default,lorot,dcl)"]) == parse_space(
        ["views.policy=grid('default','lorot','dcl')"]) == {"views.policy": Dist("grid", ("default", "lorot", "dcl"))}
    assert parse_space(["x.y=choice(a, 2)"])["x.y"] == Dist("choice", ("a", 2))


@pytest.mark.parametrize("text", ["lr=loguniform(1e-4)", "lr=loguniform(0,1)", "lr=uniform(2,1)", "lr=normal(0,1)",
                                  "lr=choice()", "lr=0.1,0.2", "lr=loguniform(a b)", "lr=uniform(a,b)",
                                  "p=choice(a b, c)", "justakey"])
def test_bad_space_strings_raise_with_the_entry(text):
    with pytest.raises(ConfigError):
        parse_space([text])


def test_space_from_yaml_file(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("lr: loguniform(1e-3, 1)\n"
                 "data.batch_size: [32, 64]\n"
                 "temperature: {dist: uniform, low: 0.1, high: 0.3}\n"
                 "optim.weight_decay: {dist: choice, values: [0.0, 1.0e-4]}\n")
    space = parse_space([str(f), "lr=loguniform(1e-2, 1)"])  # later entries win
    assert space == {"optim.base_lr": Dist("loguniform", (1e-2, 1)), "data.batch_size": Dist("choice", (32, 64)),
                     "method.temperature": Dist("uniform", (0.1, 0.3)),
                     "optim.weight_decay": Dist("choice", (0.0, 1e-4))}


def test_grid_points_span_the_range():
    assert Dist("loguniform", (1e-3, 1e-1)).grid_points(3) == pytest.approx([1e-3, 1e-2, 1e-1])
    assert Dist("uniform", (0.5, 0.9)).grid_points(3) == pytest.approx([0.5, 0.7, 0.9])
    assert Dist("choice", (16, 32)).grid_points(5) == [16, 32]
    assert parse_dist([1, 2]) == Dist("choice", (1, 2))


@pytest.mark.parametrize("method", METHODS.names())
def test_default_space_per_method(method):
    cfg = load_config(f"{method}_cifar10")
    space = default_space(cfg)
    check_space(space, cfg)  # every key is a config key that takes the sampled values
    assert space["optim.base_lr"].kind == "loguniform"
    assert space["data.batch_size"].kind == "choice" and cfg.data.batch_size in space["data.batch_size"].args
    assert ("method.temperature" in space) == (method in TEMPERATURE_RANGES)
    assert ("method.params.mask_ratio" in space) == (method == "mae")
    if cfg.optim.weight_decay > 0:
        assert space["optim.weight_decay"].kind == "loguniform"


def test_unknown_space_key_is_rejected():
    cfg = load_config("smoke")
    with pytest.raises(ConfigError, match="optim.base_lrr"):
        check_space(parse_space(["optim.base_lrr=loguniform(1e-3,1)"]), cfg)
    with pytest.raises(ConfigError, match="divide"):
        check_space(parse_space(["batch_size=choice(30,32)"]), cfg.replace(**{"ray.num_workers": 4}))


@pytest.mark.parametrize("rule,factor", [("linear", 4.0), ("sqrt", 2.0), ("none", 1.0)])
def test_trials_sample_base_lr_and_batch_scales_it(rule, factor):
    base = load_config("smoke", [f"optim.lr_scaling={rule}", "data.batch_size=256"])
    cfg = trial_config(base, {"optim.base_lr": 0.1, "data.batch_size": 1024})
    assert cfg.optim.base_lr == 0.1  # the sampled value is the lr per 256 images...
    assert effective_lr(cfg) == pytest.approx(0.1 * factor)  # ...and the batch size scales it by the rule


def test_max_concurrent_from_cluster_and_trial_size():
    assert max_concurrent_trials({"CPU": 4}, workers=1, cpus_per_worker=1, gpus_per_worker=0) == 4
    assert max_concurrent_trials({"CPU": 4}, workers=2, cpus_per_worker=1, gpus_per_worker=0) == 2
    assert max_concurrent_trials({"CPU": 5}, workers=2, cpus_per_worker=1, gpus_per_worker=0) == 2
    assert max_concurrent_trials({"CPU": 64, "GPU": 8}, workers=2, cpus_per_worker=4, gpus_per_worker=1) == 4
    assert max_concurrent_trials({"CPU": 64, "GPU": 8}, workers=1, cpus_per_worker=16, gpus_per_worker=1) == 4
    assert max_concurrent_trials({"CPU": 4}, workers=1, cpus_per_worker=1, gpus_per_worker=0, total_trials=3) == 3
    assert max_concurrent_trials({"CPU": 4, "GPU": 1}, workers=2, cpus_per_worker=0.5, gpus_per_worker=0.5) == 1
    with pytest.raises(ConfigError, match="GPU"):
        max_concurrent_trials({"CPU": 8}, workers=1, cpus_per_worker=1, gpus_per_worker=1)


def test_a_cluster_that_can_grow_is_not_refused_for_what_it_has_now(capsys, monkeypatch):
    """The cluster/*.yaml heads have CPU 0 and GPU worker groups from zero: a sweep sent there found 0 CPU
    and was refused, though the autoscaler starts nodes for waiting trials; and without --gpus-per-worker
    it trained on CPU without a word. A cluster this process joined may grow; its own instance cannot."""
    import ray

    import sslray.raytrain.trainer as T
    from sslray.tune.sweep import default_gpus_per_worker

    assert max_concurrent_trials({"CPU": 0}, workers=2, cpus_per_worker=4, gpus_per_worker=1, total_trials=6,
                                 can_grow=True) == 6
    assert "the cluster has 0 now; up to 6 trial(s) start and wait" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="the cluster has 0"):
        max_concurrent_trials({"CPU": 0}, workers=2, cpus_per_worker=4, gpus_per_worker=1, total_trials=6)

    monkeypatch.setattr(T, "ensure_ray", lambda *a, **k: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8})
    monkeypatch.setattr(T, "_OWN_INSTANCE", [False])
    assert default_gpus_per_worker("sslray tune") == 0.0
    assert "sslray tune: WARNING: the cluster has no GPU now" in capsys.readouterr().out
    monkeypatch.setattr(T, "_OWN_INSTANCE", [True])  # this machine: no GPU is simply none
    assert default_gpus_per_worker("sslray tune") == 0.0 and "WARNING" not in capsys.readouterr().out
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8, "GPU": 2})
    assert default_gpus_per_worker("sslray study") == 1.0


def test_failure_reason_names_nan_and_oom():
    nan = ("Traceback (most recent call last):\n  File x\nray.train.TrainingFailedError: Training failed\n"
           "  File loop.py\nsslray.raytrain.loop.NonFiniteLossError: simclr: non-finite loss nan at step 0\n")
    assert failure_reason(nan) == "non-finite loss: simclr: non-finite loss nan at step 0"
    oom = "Traceback\n  File y\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
    assert failure_reason(oom).startswith("out of memory: ")
    assert failure_reason("Traceback\nValueError: data.batch_size 512 is larger") == \
        "ValueError: data.batch_size 512 is larger"


def test_optuna_is_optional_with_a_clear_error():
    pytest.importorskip("ray")
    from sslray.tune.sweep import build_search, make_spec

    cfg = load_config("smoke", ["data.train=x.beton", "data.val=y.beton"])
    space = {"optim.base_lr": Dist("loguniform", (1e-3, 1.0))}
    try:
        import optuna  # noqa: F401
    except ImportError:  # refused while the spec is made: before the sweep's MLflow parent run exists
        with pytest.raises(ConfigError, match=r"pip install 'sslray\[tune\]'"):
            make_spec(cfg, space, name="s", storage="/tmp/s", search="optuna")
    else:
        assert build_search(make_spec(cfg, space, name="s", storage="/tmp/s", search="optuna"), 2) is not None


def test_schedulers_use_epochs_and_pbt_is_refused_with_a_reason():
    pytest.importorskip("ray")
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    from sslray.tune.sweep import build_scheduler, make_spec

    cfg = load_config("smoke", ["data.train=x.beton", "data.val=y.beton"])
    space = {"optim.base_lr": Dist("loguniform", (1e-3, 1.0))}
    asha = build_scheduler(make_spec(cfg, space, name="s", storage="/tmp/s", max_epochs=9, grace_period=2))
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "epoch" and asha._max_t == 9
    median = build_scheduler(make_spec(cfg, space, name="s", storage="/tmp/s", scheduler="median"))
    assert isinstance(median, MedianStoppingRule)
    with pytest.raises(ConfigError, match="TuneReportCallback"):
        make_spec(cfg, space, name="s", storage="/tmp/s", scheduler="pbt")
    with pytest.raises(ConfigError, match="--val"):
        make_spec(cfg.replace(**{"data.val": ""}), space, name="s", storage="/tmp/s")


def test_cli_parses_tune():
    from sslray.cli import build_parser

    a = build_parser().parse_args(["tune", "--method", "simclr", "--data", "t.beton", "--space", "lr=loguniform(1e-3,1)",
                                   "--space", "batch_size=choice(64,128)", "--num-samples", "6", "--name", "s",
                                   "--export", "best.yaml", "train.max_steps_per_epoch=3"])
    assert a.space == ["lr=loguniform(1e-3,1)", "batch_size=choice(64,128)"] and a.num_samples == 6
    assert a.scheduler == "asha" and a.search == "random" and a.metric == "knn_top1" and a.mode == "max"
    assert a.overrides == ["train.max_steps_per_epoch=3"]


def test_a_second_space_after_one_space_flag_is_named_not_taken_as_a_fixed_key(capsys, tmp_path):
    from sslray.cli import main

    rc = main(["tune", "--method", "simclr", "--data", str(tmp_path / "t.beton"), "--name", "s",
               "--space", "lr=loguniform(0.01,1)", "method.temperature=uniform(0.1,0.5)"])
    err = capsys.readouterr().err
    assert rc == 2 and "'method.temperature=uniform(0.1,0.5)' is a search space given as a fixed key" in err
    assert '--space "method.temperature=uniform(0.1,0.5)"' in err


# ---------------------------------------------------------------------------- real sweeps (ray, slow)

TINY = ["ray.num_workers=1", "ray.use_gpu=false", "data.train_subset=256", "data.val_subset=128",
        "data.knn_bank=256", "train.max_steps_per_epoch=3", "data.loader_workers=1"]


def _children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.mark.ray
def test_reaper_frees_placement_groups_of_dead_actors_only(ray_cluster):
    """A stopped trial's TrainController dies with its worker placement group still reserved (it lives
    as long as the job); the sweep driver frees exactly those, never its own live ones."""
    ray = ray_cluster
    from ray.util.placement_group import placement_group, remove_placement_group

    from sslray.tune.reaper import orphaned_placement_groups, reap

    @ray.remote(num_cpus=0)
    class Controller:
        def start_workers(self):
            pg = placement_group([{"CPU": 1}])
            ray.get(pg.ready())
            return pg.id.hex()

    c = Controller.remote()
    pg_id = ray.get(c.start_workers.remote())
    own = placement_group([{"CPU": 1}])
    ray.get(own.ready())
    assert pg_id not in [p.hex() for p in orphaned_placement_groups()]
    ray.kill(c)
    deadline = time.time() + 30
    while pg_id not in [p.hex() for p in orphaned_placement_groups()] and time.time() < deadline:
        time.sleep(0.2)
    assert [p.hex() for p in orphaned_placement_groups()] == [pg_id]
    assert reap() == 1 and orphaned_placement_groups() == []
    assert ray.util.placement_group_table(own)["state"] == "CREATED"
    remove_placement_group(own)


@pytest.mark.ray
@pytest.mark.slow
def test_asha_sweep_stops_trials_logs_mlflow_and_exports_a_recipe(ray_cluster, cifar_small, tmp_path, monkeypatch,
                                                                   capsys):
    """6 trials over lr, temperature and batch size; ASHA stops some before max_epochs."""
    from mlflow.tracking import MlflowClient

    from sslray.cli import main
    from sslray.raytrain.loop import run_local

    monkeypatch.chdir(tmp_path)
    rc = main(["tune", "--recipe", "smoke", "--method", "simclr", "--data", cifar_small["train"],
               "--val", cifar_small["test"], "--space", "lr=loguniform(0.01,2)", "--space", "temperature=loguniform(0.05,1)",
               "--space", "batch_size=choice(16,32,64)", "--num-samples", "6", "--scheduler", "asha",
               "--max-epochs", "3", "--grace-period", "1", "--reduction-factor", "2", "--workers-per-trial", "1",
               "--gpus-per-worker", "0", "--name", "asha", "--storage", str(tmp_path / "runs"),
               "--export", "best.yaml", "--experiment", "tune", "--quiet", *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    assert "best trial" in out and "best.yaml" in out
    # The summary says where the best trial's checkpoints are, and that folder exports its backbone.
    from sslray.export import export_backbone, load_backbone

    ckpts = next(ln.split(": ", 1)[1] for ln in out.splitlines() if ln.strip().startswith("its checkpoints:"))
    assert f"sslray export {ckpts} best-backbone/" in out
    assert load_backbone(export_backbone(ckpts, tmp_path / "best-backbone"))[1]["method"] == "simclr"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tune")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = _children(client, parent.info.run_id)
    assert len(children) == 6
    epochs = {}
    for ch in children:
        hist = client.get_metric_history(ch.info.run_id, "knn_top1")
        assert hist and all(0.0 <= m.value <= 1.0 for m in hist)
        assert sorted(m.step for m in hist) == list(range(1, len(hist) + 1))  # one point per epoch, no repeats
        assert {"loss", "lr", "images_per_sec", "knn_top5"} <= set(ch.data.metrics)
        assert ch.data.params["method.name"] == "simclr" and "sampled.optim.base_lr" in ch.data.params
        epochs[ch.data.tags["sslray.tune.trial_id"]] = len(hist)
        assert ch.data.tags["sslray.tune.status"] == ("completed" if len(hist) == 3 else "stopped_early")
    # ASHA stopped at least one trial before max_epochs (read from the trials' own results).
    assert min(epochs.values()) < 3 and max(epochs.values()) == 3, epochs
    assert parent.data.metrics["trials"] == 6 and parent.data.metrics["trials_stopped_early"] >= 1
    assert "best_knn_top1" in parent.data.metrics and "best.optim.base_lr" in parent.data.params
    assert parent.data.params["space.optim.base_lr"] == "loguniform(0.01, 2)"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "knn_top1_vs_hparams.png", "best_config.yaml", "space.json"} <= arts
    with open(client.download_artifacts(parent.info.run_id, "results.csv", str(tmp_path))) as f:
        csv_text = f.read()
    assert len(csv_text.strip().splitlines()) == 7 and "stopped_early" in csv_text

    # The exported recipe loads as a recipe and trains.
    best = load_config(str(tmp_path / "best.yaml"))
    assert best.optim.base_lr == pytest.approx(float(parent.data.params["best.optim.base_lr"]))
    assert best.data.batch_size in (16, 32, 64)
    last, _ = run_local(best.replace(**{"train.epochs": 1}))
    assert math.isfinite(last["loss"]) and "knn_top1" in last


@pytest.mark.ray
@pytest.mark.slow
def test_mae_mask_ratio_sweep_on_s3_storage(ray_cluster, s3_server, cifar_small, tmp_path, monkeypatch):
    """The MAE default space searches the mask ratio; each trial's sampled ratio reaches its config.
    The sweep keeps its state and checkpoints on object storage (a local S3): the trial states, the
    resume file and the best trial's checkpoints are there, a rerun resumes from them, and the best
    trial's backbone exports from its s3:// folder."""
    from mlflow.tracking import MlflowClient

    from sslray.export import export_backbone, load_backbone
    from sslray.storage import CACHE_ENV, read_text
    from sslray.tune.sweep import best_trial_dir, make_spec, run_sweep, saved_trial_statuses

    if "mae" not in METHODS:
        pytest.skip("mae is not registered")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    cfg = load_config("smoke", [f"data.train={cifar_small['train']}", f"data.val={cifar_small['test']}", *TINY,
                                "method.name=mae", "model.backbone=vit_tiny_patch16_224", "views.preset=mae",
                                "optim.name=adamw", "optim.base_lr=1.5e-4", "optim.weight_decay=0.05",
                                "method.params={patch_size: 8, decoder_dim: 32, decoder_depth: 1, decoder_heads: 2}"])
    space = {k: v for k, v in default_space(cfg).items() if k in ("optim.base_lr", "method.params.mask_ratio")}
    storage = s3_server.bucket("tune") + "/sweeps"
    spec = make_spec(cfg, space, name="mae", storage=storage, num_samples=2, scheduler="fifo",
                     max_epochs=1, grace_period=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = run_sweep(spec, tracking_uri=uri, experiment="mae", verbose=0)
    assert [r["status"] for r in res.rows] == ["completed", "completed"]
    ratios = [r["config"]["method.params.mask_ratio"] for r in res.rows]
    assert all(0.5 <= x <= 0.9 for x in ratios) and ratios[0] != ratios[1]
    children = _children(MlflowClient(uri), res.parent_run_id)
    assert sorted(float(c.data.params["method.params.mask_ratio"]) for c in children) == sorted(ratios)
    assert res.best_config.method.params["mask_ratio"] in ratios and res.best_config.method.params["patch_size"] == 8

    assert not (tmp_path / "runs").exists() and read_text(f"{storage}/mae/sslray_sweep.json") is not None
    assert sorted(saved_trial_statuses(f"{storage}/mae").values()) == ["TERMINATED", "TERMINATED"]
    best = best_trial_dir(res)
    assert best.startswith(f"{storage}/mae/")
    _, meta = load_backbone(export_backbone(best, tmp_path / "best"))
    assert meta["method"] == "mae" and meta["checkpoint"].startswith(best + "/")

    again = run_sweep(spec, tracking_uri=uri, experiment="mae", verbose=0)  # the same name: resumes from S3
    assert again.resumed and again.parent_run_id == res.parent_run_id
    assert [r["config"] for r in again.rows] == [r["config"] for r in res.rows]


@pytest.mark.ray
@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(ray_cluster, cifar_small, tmp_path):
    """A sweep driver killed with SIGKILL after some trials finished is resumed with the same --name and
    --storage: finished trials keep their results, a NaN trial stays failed with its reason, and the
    sweep ends with all 4 trials."""
    from mlflow.tracking import MlflowClient

    from sslray.cli import main
    from sslray.tune.sweep import saved_trial_statuses

    storage, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["tune", "--recipe", "smoke", "--data", cifar_small["train"], "--val", cifar_small["test"],
            # T=1e-39 passes the space check (positive) but overflows the logits to inf: a NaN loss at step 0.
            "--space", "temperature=grid(1.0e-39,0.2,0.3,0.5)", "--num-samples", "1", "--scheduler", "fifo",
            "--max-epochs", "1", "--workers-per-trial", "1", "--gpus-per-worker", "0", "--max-concurrent", "2",
            "--name", "killed", "--storage", str(storage), "--tracking-uri", uri, "--experiment", "resume",
            "--quiet", *TINY]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - the killed subprocess writes it
    proc = subprocess.Popen([sys.executable, "-m", "sslray.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path)
    deadline = time.time() + 400
    statuses: dict = {}
    try:
        # The event: Tune's saved experiment state shows finished trials (what a resume starts from).
        while time.time() < deadline and proc.poll() is None:
            statuses = saved_trial_statuses(str(storage / "killed"))
            if sum(s in ("TERMINATED", "ERROR") for s in statuses.values()) >= 2:
                break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    killed_at = time.time() * 1000
    finished = {t for t, s in statuses.items() if s in ("TERMINATED", "ERROR")}
    assert len(finished) >= 2, (tmp_path / "driver.log").read_text()[-3000:]
    assert len(finished) < 4, "the sweep finished before it could be killed"

    assert main(args) == 0  # same --name/--storage: resume
    res_rows = {t: s for t, s in saved_trial_statuses(str(storage / "killed")).items()}
    assert len(res_rows) == 4 and set(res_rows.values()) <= {"TERMINATED", "ERROR"}
    assert finished <= set(res_rows)  # the trials that had finished are the same trials

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("resume")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {c.data.tags["sslray.tune.trial_id"]: c for c in _children(client, parents[0].info.run_id)}
    assert set(children) == set(res_rows)
    for tid, ch in children.items():
        if float(ch.data.params["method.temperature"]) < 1e-30:
            assert ch.info.status == "FAILED" and ch.data.tags["sslray.failure"].startswith("non-finite loss")
        else:
            assert ch.info.status == "FINISHED"
            assert [m.step for m in client.get_metric_history(ch.info.run_id, "knn_top1")] == [1]
        if tid in finished:  # not rerun after the resume
            assert ch.info.end_time < killed_at
    assert parents[0].data.metrics["trials"] == 4 and parents[0].data.metrics["trials_failed"] == 1
