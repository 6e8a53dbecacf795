"""`sslray tune` guards (fast, no Ray cluster): what Tune hears from a trial, the keys a sweep forces on
every trial (also on a study's recipes), the search-space checks that run before anything starts, a
trial the config rejects failing alone, and the number of trials a sweep runs."""

from __future__ import annotations

import pickle
import re
import types

import pytest

from sslray.config import ConfigError, from_dict, load_config
from sslray.tune.space import Dist, check_space, default_space, parse_space, trial_config
from sslray.tune.sweep import best_config, make_spec

DATA = ["data.train=/d/train.beton", "data.val=/d/val.beton"]


# ------------------------------------------------------------------------------- what Tune hears


class _Queue:
    def __init__(self):
        self.items = []

    def put(self, item):
        self.items.append(item)


def test_step_reports_inside_an_epoch_are_not_tune_results():
    """Tune stops the whole sweep on a result without the scheduled metric; a step-level report
    (``partial``) has none, so only epoch reports reach Tune (their checkpoints are Train's)."""
    pytest.importorskip("ray")
    from sslray.tune import trial

    cls = trial.epoch_report_callback_class()
    cb = cls.__new__(cls)  # TuneReportCallback() itself needs a live Tune session for its queue
    cb._training_actor_item_queue = _Queue()
    step = {"epoch": 0, "step": 50, "step_loss": 4.1, "partial": 1}
    cb.after_report(None, [step, dict(step)], types.SimpleNamespace(path="/ckpt/step_50"))
    assert cb._training_actor_item_queue.items == []
    epoch = {"epoch": 1, "step": 100, "loss": 4.0, "knn_top1": 0.3}
    cb.after_report(None, [epoch, {**epoch, "knn_top1": 0.0}], types.SimpleNamespace(path="/ckpt/epoch_1"))
    assert cb._training_actor_item_queue.items == [{**epoch, "checkpoint_path": "/ckpt/epoch_1"}]
    assert pickle.loads(pickle.dumps(cls)) is trial.EpochReportCallback is cls  # Ray ships it by name


def test_run_trial_reports_through_the_epoch_filter_with_the_forced_keys(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import ray.train.torch
    import ray.tune
    from ray.train import UserCallback

    from sslray.tune import trial

    class Filter(UserCallback):  # stands in for the filter, which needs a live Tune session
        pass

    built = {}

    class Trainer:
        def __init__(self, fn, **kw):
            built.update(kw)

        def fit(self):
            built["fit"] = True

    monkeypatch.setattr(trial, "epoch_report_callback_class", lambda: Filter)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Trainer)
    monkeypatch.setattr(ray.tune, "get_context", lambda: types.SimpleNamespace(get_trial_id=lambda: "t1"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: byol}\ntrain: {knn_every: 5, epochs: 10}\n")
    base = load_config("smoke", DATA).to_dict()
    trial.run_trial({"recipe": str(recipe)}, base, str(tmp_path), 0.0, forced={"train.knn_every": 1})
    cfg = from_dict(built["train_loop_config"]["cfg"])
    assert built["fit"] and cfg.method.name == "byol" and cfg.train.knn_every == 1
    assert [type(c) for c in built["run_config"].callbacks] == [Filter]


# ----------------------------------------------------------------------- keys forced on every trial


def test_a_recipe_loaded_by_a_trial_keeps_the_sweeps_forced_keys(tmp_path):
    """The kNN metric is read every epoch: a trial that loads a recipe with ``knn_every: 5`` (every
    shipped cifar10 recipe) must still run the monitor every epoch."""
    from sslray.study import make_study_spec, method_config

    cfgs = {m: method_config(m, None, [*DATA, "train.epochs=10"]) for m in ("simclr", "byol")}
    assert {c.train.knn_every for c in cfgs.values()} == {5}
    spec = make_study_spec(cfgs, ["default"], name="st", storage=str(tmp_path))
    assert spec.forced == {"train.knn_every": 1}
    base = from_dict(spec.base)
    for method, path in zip(cfgs, spec.space["recipe"][1]):
        sampled = {"recipe": path, "views.policy": "default"}
        cfg = trial_config(base, sampled, spec.forced)
        assert cfg.method.name == method and cfg.train.knn_every == 1 and cfg.train.epochs == 10
        assert best_config(spec, {"config": sampled}).train.knn_every == 1


def test_a_forced_key_cannot_be_searched():
    cfg = load_config("smoke", DATA)
    with pytest.raises(ConfigError, match="train.knn_every"):
        make_spec(cfg, {"train.knn_every": Dist("choice", (1, 5))}, name="s", storage="/tmp/s")
    spec = make_spec(cfg, {"train.knn_every": Dist("choice", (1, 5))}, name="s", storage="/tmp/s", metric="loss",
                     mode="min")
    assert spec.forced == {}


@pytest.mark.parametrize("metric,match", [
    ("knn_tpo1", r"--metric knn_tpo1 is not a per-epoch metric.*did you mean knn_top1"),
    ("linear_top1", r"--metric linear_top1 is not a per-epoch metric.*knn_top1, knn_top5, online_probe_top1"),
    ("online_probe_top1", r"measured on the val split: give --val"),
])
def test_a_metric_the_runs_never_report_is_refused_before_any_trial(metric, match):
    """Tune only finds a missing metric at the first epoch report, trials running and the MLflow
    parent left KILLED; the probe metrics need the val split."""
    cfg = load_config("smoke", DATA[:1] + ["data.val="])
    with pytest.raises(ConfigError, match=match):
        make_spec(cfg, {}, name="s", storage="/tmp/s", metric=metric)


@pytest.mark.parametrize("metric", ["z_rankme", "collapse_feats", "online_probe_train_loss", "images_per_sec"])
def test_every_reported_kind_of_metric_can_be_scheduled_on(metric):
    spec = make_spec(load_config("smoke", DATA), {}, name="s", storage="/tmp/s", metric=metric, mode="min")
    assert spec.metric == metric and spec.forced == {}


# ------------------------------------------------------------------ search space, before anything runs


@pytest.mark.parametrize("recipe,text,match", [
    ("smoke", "batch_size=randint(64,257)", r"data.batch_size=choice\(\.\.\.\)"),
    ("smoke", "batch_size=uniform(64,512)", r"data.batch_size=choice\(\.\.\.\)"),
    ("smoke", "batch_size=loguniform(64,1024)", r"data.batch_size=choice\(\.\.\.\)"),
    ("smoke", "train.epochs=uniform(1,5)", r"train.epochs=randint\(1, 6\)"),
    ("smoke", "views.local_crops=loguniform(1,8)", r"views.local_crops is an integer"),
    ("mocov2_cifar10", "method.params.queue_size=uniform(1024,4096)", r"method.params.queue_size=randint"),
    ("mae_cifar10", "mask_ratio=uniform(0.5,1.5)", r"method.params.mask_ratio must be in \[0, 1\)"),
    ("mae_cifar10", "mask_ratio=choice(0.75,1.0)", r"method.params.mask_ratio must be in \[0, 1\)"),
    ("mae_cifar10", "method.params.mask_raito=uniform(0.5,0.9)", r"takes no method.params.mask_raito.*mask_ratio"),
    ("simclr_cifar10", "temperature=uniform(0,0.5)", r"config key 'method.temperature': softmax temperature; "
                                                      r"must be above 0, got 0.0"),
    ("dino_cifar10", "method.params.teacher_temp=choice(0.0,0.04)", r"method.params.teacher_temp must be positive"),
])
def test_space_values_a_trial_would_refuse_are_refused_by_name(recipe, text, match):
    cfg = load_config(recipe, DATA)
    with pytest.raises(ConfigError, match=match):
        check_space(parse_space([text]), cfg)


@pytest.mark.parametrize("recipe,text", [
    ("smoke", "batch_size=choice(64,128)"),
    ("smoke", "batch_size=grid(64,128)"),
    ("smoke", "train.epochs=randint(1,5)"),
    ("smoke", "optim.weight_decay=loguniform(1e-6,1e-3)"),
    ("mae_cifar10", "mask_ratio=uniform(0.5,0.9)"),
    ("mocov2_cifar10", "method.params.queue_size=choice(1024,4096)"),
    ("dino_cifar10", "method.params.warmup_teacher_temp_epochs=choice(0,10)"),
])
def test_space_values_every_trial_takes_pass(recipe, text):
    check_space(parse_space([text]), load_config(recipe, DATA))


def test_a_range_is_half_open_under_random_search_and_closed_under_grid_search():
    """Tune samples uniform(low, high) from [low, high): a mask ratio range ending at 1.0 never gives
    1.0 at random, but a grid search puts its last point on 1.0, which MAE refuses."""
    cfg = load_config("mae_cifar10", DATA)
    space = parse_space(["mask_ratio=uniform(0.5,1.0)"])
    check_space(space, cfg, "random")
    with pytest.raises(ConfigError, match=r"mask_ratio must be in \[0, 1\), got 1.0"):
        check_space(space, cfg, "grid", 3)
    assert space["method.params.mask_ratio"].reachable(grid=False)[1] < 1.0
    with pytest.raises(ConfigError, match=r"temperature.*must be above 0, got 0.0"):  # low is sampled
        check_space(parse_space(["temperature=uniform(0,0.5)"]), load_config("simclr_cifar10", DATA), "random")


def test_default_space_names_the_batch_size_when_none_divides_over_the_workers():
    cfg = load_config("simclr_cifar10", [*DATA, "data.batch_size=512", "ray.num_workers=3"])
    with pytest.raises(ConfigError, match=r"data.batch_size: none of 256, 512, 1024 .* 3 workers"):
        default_space(cfg)


# ------------------------------------------------------------ a rejected trial fails alone (MLflow)


def test_a_trial_the_config_rejects_gets_a_child_run_and_the_sweep_goes_on(tmp_path):
    pytest.importorskip("ray")
    from sslray.tracking import Tracker
    from sslray.tune.mlflow_callback import TRIAL_TAG, MLflowSweepCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker.start(uri, "tune", "sweep")
    base = load_config("smoke", DATA).to_dict()
    cb = MLflowSweepCallback(uri, "tune", parent.run_id, "sweep", base, max_epochs=2)
    bad = types.SimpleNamespace(trial_id="bad", config={"data.batch_size": 137.25}, error_file=None,
                                error_msg="ConfigError: config key 'data.batch_size': expected an integer")
    good = types.SimpleNamespace(trial_id="good", config={"data.batch_size": 64})
    cb.on_trial_start(0, [], bad)  # raising here would stop tuner.fit() for every trial
    cb.on_trial_start(0, [], good)
    cb.on_trial_error(0, [], bad)
    runs = {r.data.tags[TRIAL_TAG]: r for r in parent.client.search_runs([parent.client.get_run(
        parent.run_id).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'")}
    assert "expected an integer" in runs["bad"].data.tags["sslray.config_error"]
    assert runs["bad"].data.params["sampled.data.batch_size"] == "137.25" and runs["bad"].info.status == "FAILED"
    assert runs["good"].data.params["data.batch_size"] == "64" and runs["good"].data.tags["sslray.method"] == "simclr"


# -------------------------------------------------------------------------------- number of trials


@pytest.mark.parametrize("search,total", [("random", 12), ("grid", 4 * 3 * 3), ("optuna", 4)])
def test_total_trials_is_what_tune_runs(search, total, monkeypatch):
    """Optuna samples a grid(...) key as a categorical choice, so it runs num_samples trials."""
    import sslray.tune.sweep as S

    monkeypatch.setattr(S, "require_optuna", lambda: None)  # counting needs no optuna installed
    space = {"optim.base_lr": Dist("loguniform", (1e-3, 1.0)), "optim.weight_decay": Dist("grid", (0.0, 1e-5, 1e-4))}
    spec = make_spec(load_config("smoke", DATA), space, name="s", storage="/tmp/s", num_samples=4, search=search)
    assert spec.total_trials() == total


@pytest.mark.parametrize("argv, named", [
    (["--space", "lr=loguniform(0,1)"], r"loguniform\(0, 1\): bounds must be positive"),
    (["--num-samples", "0"], "--num-samples must be at least 1, got 0"),
    (["--reduction-factor", "1"], "--reduction-factor must be above 1, got 1"),
    (["--metric", "knn_tpo1"], "did you mean knn_top1"),
    (["method.params.foo=1"], "method.params.foo"),
    (["--data", "/nowhere/t.beton"], "data.train=/nowhere/t.beton: no such file"),
])
def test_tune_refuses_what_its_trials_would_before_ray_starts(argv, named, tiny_betons, tmp_path, capsys, no_ray):
    """Without --gpus-per-worker the sweep started Ray (to count GPUs) before the space, the options, the
    data and the method's keys were checked; each trial then failed in its own workers."""
    from sslray.cli import main
    base = ["tune", "--method", "simclr", "--data", tiny_betons["train"], "--val", tiny_betons["val"], "--name", "s",
            "--storage", str(tmp_path), "data.batch_size=32"]
    assert main(base + argv) == 2
    assert re.search(named, capsys.readouterr().err)


@pytest.mark.parametrize("extra, named", [
    (["optim.bas_lr=1"], "unknown config key.*optim.bas_lr"),
    (["method.params.foo=1"], "method.params.foo"),
    (["--batch-size", "33"], r"'data.batch_size' \(33\) must divide evenly over 2 workers"),
])
def test_study_refuses_a_bad_cell_before_ray_starts(extra, named, tiny_betons, tmp_path, capsys, no_ray):
    from sslray.cli import main
    rc = main(["study", "--methods", "simclr,byol", "--views", "default", "--data", tiny_betons["train"], "--val",
               tiny_betons["val"], "--epochs", "1", "--name", "st", "--storage", str(tmp_path), "--workers-per-trial",
               "2", "--batch-size", "32", *extra])
    assert rc == 2 and re.search(named, capsys.readouterr().err)
    assert not (tmp_path / "st").exists()  # no recipes or matrix written either


def test_the_export_path_is_checked_before_the_sweep(tmp_path, monkeypatch):
    """--export was written after the whole sweep: a folder gave IsADirectoryError, best.txt a recipe
    `sslray pretrain --recipe` refuses, and a hand-written recipe was overwritten."""
    from sslray.cli import main
    from sslray.config import ConfigError
    from sslray.tune import cli as tune_cli
    from sslray.tune.sweep import check_export_path

    monkeypatch.setattr(tune_cli, "sweep_config", lambda *a, **k: pytest.fail("the sweep ran"))
    mine = tmp_path / "mine.yaml"
    mine.write_text("optim:\n  base_lr: 0.3\n")
    (tmp_path / "dir.yaml").mkdir()
    for bad, says in ((tmp_path / "best.txt", "ends in .yaml or .yml"), (tmp_path / "dir.yaml", "is a folder"),
                      (mine, "exists and is not a recipe an earlier sweep exported")):
        with pytest.raises(ConfigError, match=says):
            check_export_path(str(bad))
        assert main(["tune", "--method", "simclr", "--data", "t.beton", "--name", "s", "--export", str(bad)]) == 2
    assert mine.read_text() == "optim:\n  base_lr: 0.3\n"
    earlier = tmp_path / "best.yaml"
    earlier.write_text("# Best trial t1 of sweep s (knn_top1 = 0.5, 3 epochs).\nmethod:\n  name: simclr\n")
    check_export_path(str(earlier))  # an earlier export may be replaced
    check_export_path(str(tmp_path / "new" / "best.yml"))


def test_a_bad_distribution_names_its_key():
    with pytest.raises(ConfigError, match=r"^--space lr: uniform\(1, 0.1\): low must be below high$"):
        parse_space(["lr=uniform(1,0.1)"])


def test_a_searched_batch_is_checked_against_the_data_at_its_smallest_value(tiny_betons, tmp_path, no_ray,
                                                                              monkeypatch):
    """The recipe's own batch (512) is larger than the 64 images, but every searched batch fits: not refused."""
    from sslray.tune import sweep as sweep_mod
    from sslray.tune.cli import sweep_config

    monkeypatch.setattr(sweep_mod, "run_sweep", lambda spec, **kw: spec)
    cfg = load_config("simclr_cifar10", [f"data.train={tiny_betons['train']}", f"data.val={tiny_betons['val']}"])
    spec = sweep_config(cfg, ["batch_size=choice(16,32)"], name="s", storage=str(tmp_path), gpus_per_worker=0)
    assert spec.space["data.batch_size"][1] == [16, 32]
    with pytest.raises(ValueError, match="data.batch_size 512 is larger than the 64 training images"):
        sweep_config(cfg, ["lr=loguniform(0.1,1)"], name="s", storage=str(tmp_path), gpus_per_worker=0)


def test_fractional_gpus_with_several_workers_per_trial_are_refused():
    """Ray packs a trial's fractional GPUs onto one device, where NCCL refuses two ranks: every trial
    would fail. One worker per trial may share a GPU; whole GPUs may have any number of workers."""
    cfg = load_config("smoke", DATA + ["ray.num_workers=2"])
    space = {"optim.base_lr": Dist("choice", (0.1, 0.2))}
    with pytest.raises(ConfigError, match=r"--gpus-per-worker 0.5 with 2 workers per trial.*--workers-per-trial 1"):
        make_spec(cfg, space, name="s", storage="/tmp/s", gpus_per_worker=0.5)
    with pytest.raises(ConfigError, match="--gpus-per-worker must be at least 0"):
        make_spec(cfg, space, name="s", storage="/tmp/s", gpus_per_worker=-1)
    assert make_spec(cfg, space, name="s", storage="/tmp/s", gpus_per_worker=1.0).gpus_per_worker == 1.0
    one = load_config("smoke", DATA + ["ray.num_workers=1"])
    assert make_spec(one, space, name="s", storage="/tmp/s", gpus_per_worker=0.5).gpus_per_worker == 0.5
