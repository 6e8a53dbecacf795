"""`sslray compare` and `sslray ui`.

Fast tier: the table's pure parts (family from the registry with the tag as fallback, temperature /
mask ratio, labels, Markdown) and the `mlflow ui` command line. Slow tier: real tiny CPU runs of >= 3
methods (tests/conftest_runs.py), then `sslray compare` through the CLI, checked against MLflow.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslray.compare import (
    COLUMNS,
    METRIC_OF,
    build_rows,
    family_of,
    knob,
    labels,
    markdown_table,
)
from sslray.tracking import KIND_TAG, RunRecord

pytest_plugins = ["conftest_runs"]


def _rec(rid, method, params=None, metrics=None, tags=None, start=0):
    return RunRecord(rid, f"{method}-resnet18-train-20260101-000000", "FINISHED",
                     {"method.name": method, "model.backbone": "resnet18", "train.epochs": "2",
                      "data.batch_size": "32", "optim.base_lr": "0.06", "method.temperature": "0.5", **(params or {})},
                     metrics or {}, tags or {}, start)


# ---- fast: pure parts -------------------------------------------------------------------------


def test_family_comes_from_the_registry_and_falls_back_to_the_tag():
    from sslray.raytrain.methods import METHODS

    for name in METHODS.names():
        assert family_of(name, {"sslray.family": "wrong"}) == METHODS.get(name).family
    assert family_of("not-a-method-here", {"sslray.family": "clustering"}) == "clustering"
    assert family_of("not-a-method-here", {}) == "unknown"


def test_global_batch_is_the_batch_per_optimizer_step():
    """The batch the lr was set for: accumulated micro-batches count, and what auto_batch settled on wins."""
    col = next(c for c in COLUMNS if c.key == "global_batch")
    assert col.get(_rec("a", "simclr"), "contrastive") == 32
    assert col.get(_rec("b", "simclr", {"train.accum_steps": "4"}), "contrastive") == 128
    settled = _rec("c", "simclr", {"train.accum_steps": "1"}, {"global_batch": 16.0, "accum_steps": 2.0})
    assert col.get(settled, "contrastive") == 32


def test_knob_is_temperature_for_softmax_families_mask_ratio_for_mim_and_blank_otherwise():
    assert knob("simclr", "contrastive", {"method.temperature": "0.2"}) == "T=0.2"
    assert knob("swav", "clustering", {"method.temperature": "0.1"}) == "T=0.1"
    assert knob("mae", "MIM", {"method.params.mask_ratio": "0.6", "method.temperature": "0.5"}) == "mask 0.6"
    assert knob("byol", "non-contrastive", {"method.temperature": "0.5"}) == "-"
    from sslray.raytrain.methods import METHODS

    if "mae" in METHODS:  # the signature default when the run did not set it
        assert knob("mae", "MIM", {"method.temperature": "0.5"}) == "mask 0.75"


def test_rows_are_ordered_by_family_and_labels_are_unambiguous():
    runs = [_rec("a" * 32, "simclr", {"method.temperature": "0.2"}, {"probe_knn_top1": 0.3}, start=2),
            _rec("b" * 32, "byol", metrics={"probe_knn_top1": 0.25}, start=1),
            _rec("c" * 32, "simclr", {"method.temperature": "0.5"}, start=3),
            _rec("d" * 32, "simclr", {"method.temperature": "0.5"}, start=4)]
    rows = build_rows(runs)
    assert [r["family"] for r in rows] == ["contrastive"] * 3 + ["non-contrastive"]
    assert rows[0]["knn_top1"] == 0.3 and math.isnan(rows[1]["knn_top1"])
    labs = labels(rows)  # the three SimCLR runs share a name: temperature, then run id, tell them apart
    name = "simclr-resnet18-train-20260101-000000"
    assert len(set(labs)) == 4 and labs[-1] == "byol-resnet18-train-20260101-000000"
    assert labs[0] == f"{name} (T=0.2)" and labs[1:3] == [f"{name} (T=0.5) (cccccc)", f"{name} (T=0.5) (dddddd)"]
    md = markdown_table(rows).splitlines()
    assert len(md) == 2 + 4 and md[0].count("|") == len(COLUMNS) + 1
    assert "30.0%" in md[2]


def _named(rid, name, method="simclr", params=None):
    r = _rec(rid, method, params)
    r.name = name
    return r


def test_labels_are_run_names_with_details_only_where_names_are_shared():
    rows = build_rows([_named("46a790" + "0" * 26, "walk1", params={"method.temperature": "0.2"}),
                       _named("b" * 32, "walk2", params={"method.temperature": "0.2"})])
    assert labels(rows) == ["walk1", "walk2"]  # no method, temperature or id where the names differ
    rows = build_rows([_named("a" * 32, "walk", params={"method.temperature": "0.2"}),
                       _named("b" * 32, "walk", params={"method.temperature": "0.5"}),
                       _named("c" * 32, "walk", "byol"),
                       _named("d" * 32, "walk", params={"method.temperature": "0.5"}),
                       _named("e" * 32, "", params={"method.temperature": "0.5"}),
                       _named("abcdef12" + "0" * 24, "same"), _named("abcdef34" + "0" * 24, "same")])
    got = dict(zip((r["run_id"][:8] for r in rows), labels(rows)))
    assert got == {"a" * 8: "walk (simclr) (T=0.2)", "b" * 8: "walk (simclr) (T=0.5) (bbbbbb)",
                   "d" * 8: "walk (simclr) (T=0.5) (dddddd)", "c" * 8: "walk (byol)",
                   "e" * 8: "simclr (eeeeee)",  # no name: the method and the id
                   "abcdef12": "same (abcdef12)", "abcdef34": "same (abcdef34)"}  # id long enough to differ


def _texts(fig) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def _visible_xticks(ax) -> list[float]:
    lo, hi = sorted(ax.get_xlim())
    return [t for t in ax.get_xticks() if lo - 1e-9 <= t <= hi + 1e-9]


def test_figures_label_runs_by_name_and_epochs_by_whole_numbers(tmp_path, monkeypatch):
    """The walk-through: two one-epoch SimCLR runs named walk1 / walk2. Every figure compare saves names
    them as the table does (not "simclr (T=0.2) (46a790)"), and the epoch axes have integer ticks only."""
    import sslray.compare as cmp
    from sslray.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    ids = {}
    for name, knn in (("walk1", 0.21), ("walk2", 0.24)):
        t = Tracker.start(uri, "walk", name, tags={"sslray.method": "simclr"})
        t.log_params({"method.name": "simclr", "model.backbone": "resnet18", "train.epochs": 1,
                      "data.batch_size": 32, "optim.base_lr": 0.06, "method.temperature": 0.2})
        t.log_metrics({"loss": 5.1 + knn, "knn_top1": knn}, step=1)
        t.log_metrics({"probe_knn_top1": knn, "probe_linear_top1": knn + 0.01, "probe_linear_macro_f1": knn})
        t.end()
        ids[name] = t.run_id
    made = {}
    real = cmp.figures
    monkeypatch.setattr(cmp, "figures", lambda rows, uri: made.update(real(rows, uri)) or made)
    res = cmp.compare("walk", tracking_uri=uri, out=str(tmp_path / "out"), log=False, print_table=False)
    assert [r["run"] for r in res.rows] == ["walk1", "walk2"]  # the table's names
    assert [p.name for p in res.files] == ["compare.csv", "compare.md", "loss_curves.png", "knn_curves.png",
                                           "probe_by_family.png"]
    assert set(made) == {"loss_curves.png", "knn_curves.png", "probe_by_family.png"}

    loss = [ax for ax in made["loss_curves.png"].axes if ax.axison]
    assert sorted(ax.get_title() for ax in loss) == ["walk1", "walk2"]
    (knn,) = made["knn_curves.png"].axes
    assert sorted(t.get_text() for t in knn.get_legend().get_texts()) == ["walk1", "walk2"]
    for ax in made["probe_by_family.png"].axes:
        assert sorted(t.get_text() for t in ax.get_xticklabels()) == ["walk1", "walk2"]
    for name, fig in made.items():  # no method / temperature / id prefix in any label where the names differ
        assert not [t for t in _texts(fig) if "T=0.2" in t or any(i[:6] in t for i in ids.values())], name

    for ax in loss + [knn]:  # one epoch: ticks 1 only, not 0.945 ... 1.05
        ticks = _visible_xticks(ax)
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), list(ax.get_xticks()))
        assert all(re.fullmatch(r"-?\d+", t.get_text()) for t in ax.get_xticklabels() if t.get_text())


def test_epoch_axes_have_integer_ticks_for_any_number_of_epochs():
    from sslray import plots

    for n in (1, 2, 3, 7, 40):
        pts = [(e, 1.0 / e) for e in range(1, n + 1)]
        for fig in (plots.overlay({"walk1": pts}, "kNN", "top-1"), plots.panels({"walk1": pts, "walk2": pts[:1]},
                                                                                   "loss", "loss")):
            fig.canvas.draw()
            for ax in fig.axes:
                if ax.axison:
                    ticks = _visible_xticks(ax)
                    assert ticks and all(float(t).is_integer() for t in ticks), (n, list(ax.get_xticks()))
            plots.close(fig)


def test_eval_metrics_fill_the_probe_columns_and_study_parents_are_skipped():
    probe = _rec("a", "simclr", metrics={"probe_knn_top1": 0.5, "eval_knn_k200_top1": 0.9})
    evaluated = _rec("b", "byol", metrics={"eval_knn_k200_top1": 0.6, "eval_linear_top1": 0.7,
                                           "eval_linear_macro_f1": 0.65, "eval_gain_linear_top1": 0.3})
    parent = _rec("c", "simclr", tags={"sslray.study": "s1"})
    sweep_parent = _rec("d", "simclr", tags={"sslray.tune.parent": "true", "sslray.method": "simclr"})
    rows = {r["run_id"]: r for r in build_rows([probe, evaluated, parent, sweep_parent])}
    assert set(rows) == {"a", "b"}
    assert rows["a"]["knn_top1"] == 0.5  # `sslray probe`'s figure wins where both exist
    assert (rows["b"]["knn_top1"], rows["b"]["linear_top1"], rows["b"]["macro_f1"], rows["b"]["gain_linear_top1"]) \
        == (0.6, 0.7, 0.65, 0.3)
    assert math.isnan(rows["a"]["linear_top1"])
    # a probe re-run without its baseline cleared gain_linear_top1 (NaN): eval's gain shows instead
    cleared = _rec("e", "byol", metrics={"gain_linear_top1": float("nan"), "eval_gain_linear_top1": 0.31})
    assert build_rows([cleared])[0]["gain_linear_top1"] == 0.31


def test_ui_command_points_mlflow_at_the_store(tmp_path):
    from sslray.cli import build_parser
    from sslray.ui import ui_command

    cmd = ui_command(f"sqlite:///{tmp_path}/m.db", "127.0.0.1", 5123)
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/m.db"
    assert cmd[cmd.index("--port") + 1] == "5123" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "mlartifacts")
    a = build_parser().parse_args(["ui"])
    assert (a.port, a.host) == (5000, "127.0.0.1")


def test_ui_url_brackets_an_ipv6_host():
    from sslray.ui import ui_url

    assert ui_url("::1", 5000) == "http://[::1]:5000" and ui_url("::", 80) == "http://localhost:80"
    assert ui_url("127.0.0.1", 5000) == "http://127.0.0.1:5000"


def test_tracking_uris_that_are_not_folders_are_kept(tmp_path, monkeypatch):
    from sslray.tracking import resolve_uri

    monkeypatch.chdir(tmp_path)
    for uri in ("databricks", "databricks-uc", "databricks://profile", "file:./mlruns", "http://mlflow:5000"):
        assert resolve_uri(uri) == uri
    assert resolve_uri("mlruns") == str(tmp_path / "mlruns")
    assert resolve_uri("sqlite:///m.db") == f"sqlite:///{tmp_path / 'm.db'}"


def test_odd_experiment_names_keep_their_own_artifact_folder_and_compare_folder(tmp_path, monkeypatch):
    """MLflow takes any experiment name; a slash must not leave the store's folder, # or ? not cut the URI."""
    from mlflow.tracking import MlflowClient

    from sslray.compare import compare
    from sslray.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    where = {}
    for name in ("ab", "ab#2", "ab?x=1", "/Shared/exp"):
        t = Tracker.start(uri, name, "r", tags={"sslray.method": "simclr"})
        t.log_text("hello", "x.txt")
        t.end()
        where[name] = Path(MlflowClient(uri).download_artifacts(t.run_id, "x.txt", str(tmp_path / "dl" / t.run_id)))
    found = sorted(str(p.relative_to(tmp_path / "mlartifacts")).split("/")[0] for p in
                   (tmp_path / "mlartifacts").rglob("x.txt"))
    assert found == ["Shared_exp", "ab", "ab_2", "ab_x_1"]
    assert all(p.read_text() == "hello" for p in where.values())
    res = compare("/Shared/exp", tracking_uri=uri, log=False, print_table=False)
    assert Path(res.files[0]).parent == tmp_path / "compare" / "Shared_exp"


def test_a_deleted_experiment_is_named_with_the_way_back(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from sslray.cli import main
    from sslray.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    Tracker.start(uri, "gone", "r1").end()
    c = MlflowClient(uri)
    c.delete_experiment(c.get_experiment_by_name("gone").experiment_id)
    with pytest.raises(ValueError, match="MLflow experiment 'gone' in .* was deleted: restore it"):
        Tracker.start(uri, "gone", "r2")
    assert main(["compare", "--experiment", "gone", "--tracking-uri", uri, "--no-log"]) == 2
    assert "was deleted" in capsys.readouterr().err


def test_a_run_named_twice_is_one_row(tmp_path):
    from sslray.tracking import Tracker, search_runs

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    a, b = Tracker.start(uri, "e", "a"), Tracker.start(uri, "e", "b")
    got = search_runs(uri, "e", [a.run_id, a.run_id[:8], b.run_id[:8]])
    assert [r.run_id for r in got] == [a.run_id, b.run_id]


# ---- slow: real runs, the CLI, MLflow -----------------------------------------------------------


def _png_ok(path):
    with Image.open(path) as im:
        assert im.width > 300 and im.height > 200, path
        assert len(np.unique(np.asarray(im.convert("L")))) > 10, f"{path} is blank"


@pytest.mark.ray
@pytest.mark.slow
def test_runs_have_readable_names_and_filterable_tags(tiny_runs):
    from mlflow.tracking import MlflowClient

    from sslray.raytrain.methods import METHODS

    c = MlflowClient(tiny_runs.uri)
    exp = c.get_experiment_by_name(tiny_runs.experiment)
    for method in set(tiny_runs.methods):
        runs = c.search_runs([exp.experiment_id], f"tags.`sslray.method` = '{method}'")
        assert runs, method
        for r in runs:
            backbone = r.data.params["model.backbone"]
            assert re.fullmatch(rf"{method}-{backbone}-train-\d{{8}}-\d{{6}}", r.info.run_name), r.info.run_name
            t = r.data.tags
            assert t["sslray.family"] == METHODS.get(method).family and t["sslray.dataset"] == "train"
            assert re.fullmatch(r"[0-9a-f]{7,40}|unknown", t["sslray.git_sha"])


@pytest.mark.ray
@pytest.mark.slow
def test_compare_table_and_figures_match_mlflow(tiny_runs, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from sslray.cli import main
    from sslray.raytrain.methods import METHODS

    out = tmp_path / "cmp"
    rc = main(["compare", "--experiment", tiny_runs.experiment, "--tracking-uri", tiny_runs.uri, "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "kNN top-1" in printed and all(m in printed for m in tiny_runs.methods)

    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    n = len(tiny_runs.methods)
    assert len(rows) == n and n >= 3 and len({r["method"] for r in rows}) >= 3
    md = [ln for ln in (out / "compare.md").read_text().splitlines() if ln.startswith("|")]
    assert len(md) == 2 + n

    c = MlflowClient(tiny_runs.uri)
    for row in rows:
        run = c.get_run(row["run_id"])
        p, m = run.data.params, run.data.metrics
        assert row["run"] == run.info.run_name
        assert row["method"] == p["method.name"] and row["family"] == METHODS.get(p["method.name"]).family
        assert row["backbone"] == p["model.backbone"]
        assert float(row["epochs"]) == float(p["train.epochs"])
        assert float(row["global_batch"]) == float(p["data.batch_size"])
        assert float(row["base_lr"]) == float(p["optim.base_lr"])
        for col, key in METRIC_OF.items():
            assert float(row[col]) == m[key], (row["method"], col)  # exact: the CSV keeps MLflow's floats
        if row["family"] == "MIM":
            assert row["temperature_or_mask"] == f"mask {float(p.get('method.params.mask_ratio', 0.75)):g}"
        elif row["family"] == "contrastive":
            assert row["temperature_or_mask"] == f"T={float(p['method.temperature']):g}"

    for name in ("loss_curves.png", "knn_curves.png", "probe_by_family.png"):
        _png_ok(out / name)

    # One summary run, tagged, holding everything; a second compare does not count it as a run.
    exp = c.get_experiment_by_name(tiny_runs.experiment)
    summaries = c.search_runs([exp.experiment_id], f"tags.`{KIND_TAG}` = 'compare'")
    assert len(summaries) == 1
    arts = {a.path for a in c.list_artifacts(summaries[0].info.run_id)}
    assert {"compare.csv", "compare.md", "loss_curves.png", "knn_curves.png", "probe_by_family.png"} <= arts
    rc = main(["compare", "--experiment", tiny_runs.experiment, "--tracking-uri", tiny_runs.uri,
               "--out", str(tmp_path / "again"), "--no-log"])
    assert rc == 0
    with open(tmp_path / "again" / "compare.csv") as f:
        assert len(list(csv.DictReader(f))) == n


def test_compare_names_the_missing_experiment(tmp_path, capsys):
    from sslray.cli import main

    rc = main(["compare", "--experiment", "nope", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--no-log"])
    assert rc == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err
