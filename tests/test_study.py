"""`sslray study`: per-method configs, the grid spec, the matrix outputs (fast); a 2 methods x 2 view
policies study on a small real Imagenette subset through Ray Tune + Ray Train + MLflow (ray, slow)."""

from __future__ import annotations

import csv
import io
import math
import tarfile
from pathlib import Path

import pytest

from sslray.config import ConfigError, from_dict, load_config
from sslray.study import (
    check_policies,
    heatmap,
    make_study_spec,
    matrix,
    method_config,
    scoped_overrides,
    to_csv,
    to_markdown,
)
from sslray.tune.space import trial_config

# --------------------------------------------------------------------------------------------- fast

COMMON = ["data.train=/d/train.beton", "data.val=/d/val.beton", "train.epochs=2"]


def test_each_method_keeps_its_own_recipe_under_the_shared_settings():
    cfgs = {m: method_config(m, None, [*COMMON, "model.backbone=resnet10t"]) for m in ("simclr", "byol", "barlowtwins")}
    assert {m: (c.optim.name, c.views.preset) for m, c in cfgs.items()} == {
        "simclr": ("sgd", "simclr"), "byol": ("lars", "byol"), "barlowtwins": ("lars", "byol")}
    assert all(c.model.backbone == "resnet10t" and c.train.epochs == 2 for c in cfgs.values())
    assert cfgs["byol"].method.params["momentum"] == load_config("byol_cifar10").method.params["momentum"]


def test_a_shared_recipe_gets_each_methods_own_view_preset():
    assert method_config("byol", "smoke", COMMON).views.preset == "byol"
    assert method_config("dino", "smoke", COMMON).views.preset == "dino"


def test_scoped_overrides_apply_to_their_method_only():
    over = ["data.batch_size=64", "byol:method.params.pred_hidden_dim=64", "data.train=s3://b/x:y.beton"]
    assert scoped_overrides("byol", over) == ["data.batch_size=64", "method.params.pred_hidden_dim=64",
                                              "data.train=s3://b/x:y.beton"]
    assert scoped_overrides("simclr", over) == ["data.batch_size=64", "data.train=s3://b/x:y.beton"]


def test_spec_is_a_grid_of_resolved_recipes_by_policy(tmp_path):
    cfgs = {m: method_config(m, None, COMMON) for m in ("simclr", "byol")}
    spec = make_study_spec(cfgs, ["default", "lorot", "dcl"], name="st", storage=str(tmp_path))
    assert spec.search == "grid" and spec.scheduler == "fifo" and spec.num_samples == 1
    assert spec.total_trials() == 6 and spec.train_fn == "sslray.study:study_train_func"
    kind, recipes = spec.space["recipe"]
    assert kind == "grid" and all(p.startswith(str(tmp_path / "st" / "recipes")) for p in recipes)
    base = from_dict(spec.base)
    for method, path in zip(("simclr", "byol"), recipes):
        cfg = trial_config(base, {"recipe": path, "views.policy": "dcl"})
        assert cfg == cfgs[method].replace(**{"views.policy": "dcl"})


def test_object_storage_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """The trials read their row's recipe file by path, so a study needs a folder every node reads."""
    monkeypatch.chdir(tmp_path)
    cfgs = {"simclr": method_config("simclr", None, COMMON)}
    with pytest.raises(ConfigError, match="local or shared path, not s3://bucket/studies"):
        make_study_spec(cfgs, ["default"], name="st", storage="s3://bucket/studies")
    assert not list(tmp_path.iterdir())  # no "s3:" folder made from the URI


def test_unknown_policy_or_method_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(ConfigError, match="nope.*known: .*lorot"):
        check_policies(["default", "nope"])
    from sslray.cli import main

    assert main(["study", "--methods", "simclr,nosuch", "--data", "x", "--val", "y", "--epochs", "1",
                 "--name", "s", "--storage", str(tmp_path), "--gpus-per-worker", "0"]) == 2
    assert "unknown method(s) nosuch; known: " in capsys.readouterr().err


def test_a_scope_that_names_no_method_of_the_study_is_refused(tmp_path, capsys):
    from sslray.cli import main

    assert main(["study", "--methods", "simclr,byol", "--views", "default", "--data", "x", "--val", "y",
                 "--epochs", "1", "--name", "s", "--storage", str(tmp_path), "--gpus-per-worker", "0",
                 "byl:method.params.pred_hidden_dim=64", "byol:method.params.pred_hidden_dim=64",
                 "data.train=s3://b/x:y.beton"]) == 2
    err = capsys.readouterr().err
    assert "override scope(s) byl: name no method of this study (--methods simclr,byol)" in err
    assert not list(tmp_path.iterdir())  # refused before any recipe is written


def test_a_resumed_study_shows_and_logs_the_grid_it_ran_and_links_every_row_to_its_run(tmp_path, monkeypatch,
                                                                                        capsys):
    """The sweep resumes its stored grid whatever the new command line lists: the matrix shows that grid,
    the parent's params are not changed (MLflow refuses that), and matrix.csv names each cell's child run."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    import sslray.study as study
    import sslray.tune.sweep as sweep_mod
    from sslray.tracking import Tracker
    from sslray.tune.mlflow_callback import PARENT_TAG, TRIAL_TAG
    from sslray.tune.space import Dist

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker.start(uri, "study", "st", tags={"sslray.tune.parent": "true"})
    grid = [(m, p) for m in ("simclr", "byol") for p in ("default", "lorot")]
    child_of = {}
    for i, _ in enumerate(grid):
        child = Tracker.start(uri, "study", f"st-t{i}", tags={TRIAL_TAG: f"t{i}", PARENT_TAG: parent.run_id},
                              parent_run_id=parent.run_id)
        child_of[f"t{i}"] = child.run_id
        child.end()
    parent.end()
    spec = SimpleNamespace(name="st", base=load_config("smoke", COMMON).to_dict(), max_epochs=1, gpus_per_worker=0,
                           max_concurrent=1, dists={"recipe": Dist("grid", tuple(f"/r/recipes/{m}.yaml" for m in
                                                                                  ("simclr", "byol"))),
                                                    "views.policy": Dist("grid", ("default", "lorot"))})
    sweep = SimpleNamespace(spec=spec, sweep_dir=str(tmp_path / "st"), parent_run_id=parent.run_id, tracking_uri=uri)
    monkeypatch.setattr(sweep_mod, "run_sweep", lambda *a, **k: sweep)
    monkeypatch.setattr(study, "collect_cells", lambda sw: [
        {"method": m, "policy": p, "status": "completed", "reason": "", "trial_id": f"t{i}", "linear_top1": 0.3,
         "knn_top1": 0.2, "train_seconds": 1.0} for i, (m, p) in enumerate(grid)])
    monkeypatch.setattr(study, "probe_cells", lambda *a, **k: None)

    first = study.run_study(None, ["simclr", "byol"], ["default", "lorot"], tracking_uri=uri)
    assert "resumed its own grid" not in capsys.readouterr().out
    again = study.run_study(None, ["byol", "simclr"], ["default"], tracking_uri=uri)  # resumed, other lists
    out = capsys.readouterr().out
    assert "st resumed its own grid: --methods simclr,byol --views default,lorot" in out
    assert "asked for --methods byol,simclr --views default" in out
    assert (again.methods, again.policies) == (first.methods, first.policies) == (["simclr", "byol"],
                                                                                  ["default", "lorot"])
    assert "| simclr | 30.0% | 30.0% |" in Path(again.files["markdown"]).read_text()
    rows = list(csv.DictReader(io.StringIO(Path(again.files["csv"]).read_text())))
    assert {r["run_id"] for r in rows} == set(child_of.values())
    assert all(r["run_id"] == child_of[r["trial_id"]] for r in rows)
    run = MlflowClient(uri).get_run(parent.run_id)
    assert run.data.params["study.methods"] == "simclr,byol" and run.data.params["study.policies"] == "default,lorot"


def _cells():
    cells = []
    for i, m in enumerate(("simclr", "byol")):
        for j, p in enumerate(("default", "lorot")):
            cells.append({"method": m, "policy": p, "status": "completed", "trial_id": f"t{i}{j}", "reason": "",
                          "linear_top1": 0.1 * (i + 1) + 0.01 * j, "knn_top1": 0.2 + 0.01 * j, "train_seconds": 10.0})
    cells[-1].update(status="failed", reason="out of memory: ...")
    del cells[-1]["linear_top1"]
    return cells


def test_matrix_markdown_and_csv():
    cells, methods, policies = _cells(), ["simclr", "byol"], ["default", "lorot"]
    m = matrix(cells, methods, policies, "linear_top1")
    assert m[0] == [pytest.approx(0.1), pytest.approx(0.11)] and m[1][0] == pytest.approx(0.2) and math.isnan(m[1][1])
    md = to_markdown(cells, methods, policies, "t")
    assert "| simclr | 10.0% | 11.0% |" in md and "| byol | 20.0% | n/a |" in md
    assert "byol x lorot: failed, out of memory" in md and "### peak GPU MiB" in md
    rows = list(csv.DictReader(io.StringIO(to_csv(cells, methods, policies))))
    assert [(r["method"], r["policy"]) for r in rows] == [(a, b) for a in methods for b in policies]
    assert rows[0]["linear_top1"] == "0.1" and rows[3]["linear_top1"] == ""


def test_heatmap_has_a_panel_per_metric_and_skips_missing_gpu_memory():
    fig = heatmap(_cells(), ["simclr", "byol"], ["default", "lorot"], "t")
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["linear top-1", "kNN top-1", "train seconds"]
    cells = _cells()
    for c in cells:
        c["peak_gpu_mem_mb"] = 100.0
    fig = heatmap(cells, ["simclr", "byol"], ["default", "lorot"], "t")
    assert "peak GPU MiB" in [ax.get_title() for ax in fig.axes]


def test_peak_memory_session_adds_memory_to_every_report(monkeypatch):
    import torch

    from sslray.raytrain.session import RaySession
    from sslray.study import PeakMemorySession

    seen = []
    monkeypatch.setattr(RaySession, "report", lambda self, metrics, state=None: seen.append((metrics, state)))
    s = object.__new__(PeakMemorySession)  # no Ray Train context needed for report()
    s.device = torch.device("cpu")
    s.report({"epoch": 1, "loss": 0.5}, {"model": 1})
    (metrics, state), = seen
    assert metrics["epoch"] == 1 and state == {"model": 1}
    assert metrics["peak_rss_mb"] > 10 and "peak_gpu_mem_mb" not in metrics  # CPU: no GPU figure is made up


# --------------------------------------------------------------------------------------- ray, slow

IMAGENETTE_PER_CLASS = {"train": 0.02, "val": 0.02}  # ~19 train and ~8 val images per class, 10 classes


@pytest.fixture(scope="module")
def imagenette_small(tmp_path_factory):
    """The shared Imagenette extracted, then a small per-class subset converted with `sslray convert`."""
    from conftest import IMAGENETTE_ARCHIVE, require_archive

    from sslray.cli import main

    require_archive(IMAGENETTE_ARCHIVE)
    root = tmp_path_factory.mktemp("imagenette")
    with tarfile.open(IMAGENETTE_ARCHIVE) as tf:
        tf.extractall(root / "src", filter="data")
    out = {}
    for split, frac in IMAGENETTE_PER_CLASS.items():
        beton = root / f"{split}.beton"
        assert main(["convert", str(root / "src"), str(beton), "--split", split, "--fraction", str(frac),
                     "--max-res", "64", "--workers", "2"]) == 0
        out[split] = str(beton)
    return out


TINY_STUDY = ["--backbone", "resnet10t", "--batch-size", "32", "--workers-per-trial", "1", "--gpus-per-worker", "0",
              "model.cifar_stem=false", "model.proj_hidden_dim=64", "model.proj_out_dim=32", "data.decode_res=32",
              "views.crop_size=32", "data.loader_workers=1", "train.max_steps_per_epoch=2", "train.log_every=0",
              "optim.warmup_epochs=0", "ray.num_to_keep=1", "byol:method.params.pred_hidden_dim=64"]


@pytest.mark.ray
@pytest.mark.slow
def test_study_methods_x_policies_on_imagenette(ray_cluster, imagenette_small, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from sslray.cli import main
    from sslray.datasets.loader import dataset_info

    assert len(dataset_info(imagenette_small["train"]).classes) == 10
    monkeypatch.chdir(tmp_path)
    methods, policies = ["simclr", "byol"], ["default", "dcl"]  # 4 cells, ~1 min of Ray start-up each
    rc = main(["study", "--methods", ",".join(methods), "--views", ",".join(policies),
               "--data", imagenette_small["train"], "--val", imagenette_small["val"], "--epochs", "1",
               "--name", "inette", "--storage", str(tmp_path / "runs"), "--experiment", "study", "--quiet",
               *TINY_STUDY])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "### linear top-1" in out and "| byol |" in out
    assert "4 trial(s) of simclr, byol" in out  # not "of simclr": the grid holds both methods

    study_dir = tmp_path / "runs" / "inette" / "study"
    rows = list(csv.DictReader(io.StringIO((study_dir / "matrix.csv").read_text())))
    assert [(r["method"], r["policy"]) for r in rows] == [(m, p) for m in methods for p in policies]
    for r in rows:
        assert r["status"] == "completed" and not r["reason"], r
        for key in ("linear_top1", "knn_top1", "knn_top1_monitor"):
            assert 0.0 <= float(r[key]) <= 1.0, (key, r)
        assert float(r["train_seconds"]) > 0 and float(r["peak_rss_mb"]) > 0 and r["peak_gpu_mem_mb"] == ""
    assert (study_dir / "heatmap.png").stat().st_size > 10_000

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("study")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params["study.methods"] == "simclr,byol" and parent.data.metrics["cells"] == 4
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert arts == {"study/matrix.csv", "study/matrix.md", "study/heatmap.png"}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    cells = {(c.data.tags["sslray.study.method"], c.data.tags["sslray.study.policy"]): c for c in children}
    assert set(cells) == {(m, p) for m in methods for p in policies}
    by_csv = {(r["method"], r["policy"]): r for r in rows}
    for key, child in cells.items():
        assert child.data.params["method.name"] == key[0] and child.data.params["views.policy"] == key[1]
        assert child.data.metrics["probe_linear_top1"] == pytest.approx(float(by_csv[key]["linear_top1"]))
        assert child.info.run_name == f"inette-{key[0]}-{key[1]}" and by_csv[key]["run_id"] == child.info.run_id
    # each method ran its own recipe (BYOL with LARS, SimCLR with SGD)
    assert cells[("byol", "dcl")].data.params["optim.name"] == "lars"
    assert cells[("simclr", "default")].data.params["optim.name"] == "sgd"
