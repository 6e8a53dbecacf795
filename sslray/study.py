"""`sslray study`: SSL methods x view policies as one Ray Tune grid, one MLflow parent run, a results matrix.

Each cell (method, policy) is a Tune trial that fits a TorchTrainer through the sweep driver of
``sslray tune`` (``sslray.tune.sweep.run_sweep``): the grid runs over two keys, ``recipe`` (one
resolved config per method: the method's own recipe plus the study's shared settings, written under
``<storage>/<name>/recipes/``) and ``views.policy``. The sweep's parent MLflow run holds every cell as
a child run. After the grid, each cell's final checkpoint gets the offline linear probe and kNN (in
as many Ray tasks as cells trained at once, so they run where the GPUs are), and the driver writes the matrix
method x policy -> linear top-1, kNN top-1, train seconds, peak GPU memory: printed, saved under
``<storage>/<name>/study/`` and attached to the parent run as CSV, Markdown and a heatmap PNG.
Only the driver writes to MLflow.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import resource
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, absolute_paths, dump_yaml, from_dict, load_config
from .storage import absolute as _abs

TRAIN_FN = "sslray.study:study_train_func"
STUDY_TAG = "sslray.study"
DEFAULT_VIEWS = "default,orthogonality,lorot,dcl"
# The matrix: (key, heading, number format); top-1 values are fractions in [0, 1].
MATRIX = (("linear_top1", "linear top-1", "{:.1%}"), ("knn_top1", "kNN top-1", "{:.1%}"),
          ("train_seconds", "train seconds", "{:.1f}"), ("peak_gpu_mem_mb", "peak GPU MiB", "{:.0f}"))
CSV_COLUMNS = ("method", "policy", "status", "linear_top1", "linear_top5", "linear_macro_f1", "knn_top1",
               "knn_top5", "knn_top1_monitor", "epochs", "train_seconds", "wall_seconds", "peak_gpu_mem_mb",
               "peak_rss_mb", "trial_id", "run_id", "reason")


def _names(text: str) -> list[str]:
    return list(dict.fromkeys(x.strip().lower() for x in text.split(",") if x.strip()))


# ------------------------------------------------------------------------------------------ configs

def _scoped(text: str) -> tuple[str | None, str]:
    """``"byol:k=v"`` -> ``("byol", "k=v")``; ``"k=v"`` -> ``(None, "k=v")`` (a ``:`` in the value is not a scope)."""
    if ":" in text.split("=", 1)[0]:
        scope, _, rest = text.partition(":")
        return scope.strip().lower(), rest
    return None, text


def scoped_overrides(method: str, overrides: Sequence[str]) -> list[str]:
    """``key=value`` applies to every method, ``METHOD:key=value`` to that method only (e.g.
    ``byol:method.params.pred_hidden_dim=512``: keys of ``method.params`` differ between methods)."""
    return [rest for scope, rest in map(_scoped, overrides) if scope in (None, method)]


def check_scopes(methods: Sequence[str], overrides: Sequence[str]) -> None:
    """Every ``METHOD:`` scope names one of the study's methods (a mistyped scope would otherwise
    leave every cell at the recipe's value without a word)."""
    stray = sorted({scope for scope, _ in map(_scoped, overrides) if scope is not None} - set(methods))
    if stray:
        raise ConfigError(f"override scope(s) {', '.join(s + ':' for s in stray)} name no method of this study "
                          f"(--methods {','.join(methods)})")


def method_config(method: str, recipe: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """One method's config for every cell of its row: its own recipe (``<method>_cifar10``) or the shared
    ``recipe`` with the method's own view preset, then the study's settings (``overrides``, see
    ``scoped_overrides``) on top."""
    from .raytrain.methods import recipe_config

    cfg = recipe_config(method, recipe, scoped_overrides(method, overrides), method_views=True)
    return absolute_paths(cfg).replace(**{"tracking.run_name": "", "ray.name": ""})


def check_policies(policies: Sequence[str]) -> None:
    from .datasets.policies import VIEW_POLICIES

    bad = [p for p in policies if p not in VIEW_POLICIES]
    if bad:
        raise ConfigError(f"unknown view polic{'y' if len(bad) == 1 else 'ies'} {', '.join(bad)}; "
                          f"known: {', '.join(VIEW_POLICIES.names())}")


def write_recipes(cfgs: dict[str, Config], sweep_dir: str) -> dict[str, str]:
    """``<sweep_dir>/recipes/<method>.yaml``: the resolved config the trials of that row load. A resumed
    study keeps the files it started with (the sweep also keeps its stored settings)."""
    from .tune.sweep import META_FILE

    d = Path(sweep_dir) / "recipes"
    resuming = (Path(sweep_dir) / META_FILE).exists()
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for method, cfg in cfgs.items():
        p = d / f"{method}.yaml"
        if not (resuming and p.exists()):
            p.write_text(f"# sslray study: the resolved config of every {method} cell\n" + dump_yaml(cfg))
        paths[method] = str(p)
    return paths


def make_study_spec(cfgs: dict[str, Config], policies: Sequence[str], *, name: str, storage: str,
                    gpus_per_worker: float = 0.0, max_concurrent: int = 0, seed: int = 0):
    """The grid as a ``SweepSpec`` for ``run_sweep``: ``recipe`` (one per method) x ``views.policy``,
    one sample each, FIFO (every cell trains to the end), workers entered through ``study_train_func``."""
    from .tune.space import RECIPE_KEY, Dist
    from .tune.sweep import make_spec

    if not cfgs or not policies:
        raise ConfigError("a study needs at least one method (--methods) and one view policy (--views)")
    check_policies(policies)
    from .datasets.policies import check_policy

    for method, cfg in cfgs.items():
        for policy in policies:
            try:
                check_policy(cfg.views.preset, policy)
            except ConfigError as e:
                raise ConfigError(f"study cell {method} x {policy}: {e}") from None
    if "://" in storage:  # the trials load their row's recipe file by path; the matrix files are local
        raise ConfigError(f"sslray study keeps its recipes and matrix in a folder every node reads: give --storage "
                          f"a local or shared path, not {storage} (sslray pretrain and sslray tune take s3:// and gs://)")
    storage = _abs(storage)
    paths = write_recipes(cfgs, f"{storage.rstrip('/')}/{name}")
    base = next(iter(cfgs.values()))
    space = {RECIPE_KEY: Dist("grid", tuple(paths.values())), "views.policy": Dist("grid", tuple(policies))}
    return make_spec(base, space, name=name, storage=storage, num_samples=1, scheduler="fifo", search="grid",
                     metric="knn_top1", mode="max", max_epochs=max(c.train.epochs for c in cfgs.values()),
                     grace_period=1, gpus_per_worker=gpus_per_worker, max_concurrent=max_concurrent, seed=seed,
                     train_fn=TRAIN_FN)


# ------------------------------------------------------------------------------- inside the workers

def _peak_memory_session() -> type:
    """``PeakMemorySession``, defined on first use (``from sslray.study import PeakMemorySession`` works
    as before): it subclasses ``RaySession``, which loads torch, and ``sslray --help`` imports this
    module to register ``sslray study``."""
    cls = globals().get("PeakMemorySession")
    if cls is not None:
        return cls
    import torch

    from .raytrain.session import RaySession

    class PeakMemorySession(RaySession):
        """The Ray Train session of a study cell: every report also carries the worker's peak memory,
        ``peak_gpu_mem_mb`` (``torch.cuda.max_memory_allocated``, on GPU only) and ``peak_rss_mb``."""

        def report(self, metrics: dict[str, Any], state: dict | None = None) -> None:
            extra = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
            if self.device.type == "cuda":
                extra["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            super().report({**metrics, **extra}, state)

    PeakMemorySession.__qualname__ = "PeakMemorySession"  # pickled by name: sslray.study.PeakMemorySession
    globals()["PeakMemorySession"] = PeakMemorySession
    return PeakMemorySession


def __getattr__(name: str) -> Any:
    if name == "PeakMemorySession":
        return _peak_memory_session()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def study_train_func(config: dict) -> None:
    """Ray Train entry point of a study cell: the ordinary loop with ``PeakMemorySession``."""
    from .raytrain.loop import train_loop

    cfg = from_dict(config["cfg"])
    train_loop(cfg, _peak_memory_session()(cfg.ray.use_gpu))


def probe_cells_task(jobs: list[dict]) -> list[dict]:
    """Offline linear probe + kNN of several cells' final checkpoints, one after the other in one Ray
    task (one process start and one loader compile for all of them). A failing cell returns its error."""
    from .raytrain.evaluate import probe_checkpoint

    out = []
    for job in jobs:
        try:
            rep = probe_checkpoint(**job, random_baseline=False, log=lambda *a, **k: None)
            out.append({**rep.pretrained, "linear_converged": bool(rep.probe.converged)})
        except Exception as e:  # noqa: BLE001 - one cell's probe failing must not lose the others
            out.append({"reason": f"probe failed: {type(e).__name__}: {str(e).strip()[:300]}"})
    return out


# ------------------------------------------------------------------------------------ the driver

@dataclass
class StudyResult:
    cells: list[dict]
    methods: list[str]
    policies: list[str]
    parent_run_id: str
    tracking_uri: str
    files: dict[str, str]
    sweep: Any = field(default=None, repr=False)  # the SweepResult


def grid_axes(spec) -> tuple[list[str], list[str]]:
    """The methods and view policies of the grid a sweep ran, in their order: a resumed study runs the
    grid it was started with, whatever the new command line lists. A row's method is the name of its
    recipe file (``recipes/<method>.yaml``, see ``write_recipes``)."""
    from .tune.space import RECIPE_KEY

    d = spec.dists
    return [Path(p).stem for p in d[RECIPE_KEY].args], [str(p) for p in d["views.policy"].args]


def collect_cells(sweep) -> list[dict]:
    """One dict per trial: method, policy, status, monitor kNN, train/wall seconds, peak memory."""
    from .tune.space import trial_config

    base = from_dict(sweep.spec.base)
    rows = {r["trial_id"]: r for r in sweep.rows}
    cells = []
    for result in sweep.results:
        trial_id = Path(result.path).name.removeprefix("trial_")
        cfg = trial_config(base, result.config or {}, sweep.spec.forced)
        m = dict(result.metrics or {})
        row = rows.get(trial_id, {})
        cell: dict[str, Any] = {"method": cfg.method.name, "policy": cfg.views.policy, "trial_id": trial_id,
                                "config": cfg, "status": row.get("status", "failed" if result.error else "completed"),
                                "reason": row.get("reason", ""), "epochs": int(m.get("epoch", 0) or 0),
                                "knn_top1_monitor": m.get("knn_top1"), "wall_seconds": m.get("time_total_s")}
        df = result.metrics_dataframe
        if df is not None and "epoch_seconds" in df.columns:
            cell["train_seconds"] = float(df["epoch_seconds"].dropna().sum())
        for key in ("peak_gpu_mem_mb", "peak_rss_mb"):
            if df is not None and key in df.columns and df[key].notna().any():
                cell[key] = float(df[key].max())
        cells.append(cell)
    return cells


def probe_cells(cells: list[dict], sweep_dir: str, gpus_per_worker: float, train_subset: int = 0,
                val_subset: int = 0, tasks: int = 1) -> None:
    """Linear probe + kNN on every finished cell's last checkpoint, spread over ``tasks`` parallel Ray
    tasks (as many as cells trained at once), each on a GPU when the cells had one."""
    import ray

    from .raytrain.evaluate import find_state
    from .tune.trial import TRAIN_DIR, trial_train_name

    gpu = gpus_per_worker > 0
    todo = []
    for c in cells:
        if c["status"] == "failed":
            continue
        try:
            ckpt = find_state(Path(sweep_dir) / TRAIN_DIR / trial_train_name(c["trial_id"]))
        except FileNotFoundError as e:
            c["reason"] = f"probe: {e}"
            continue
        cfg = c["config"]
        todo.append((c, {"checkpoint": str(ckpt), "train": cfg.data.train, "val": cfg.data.val,
                         "train_subset": train_subset or cfg.data.train_subset,
                         "val_subset": val_subset or cfg.data.val_subset, "knn_k": cfg.train.knn_k,
                         "use_gpu": "true" if gpu else "false"}))
    if not todo:
        return
    task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=0)(probe_cells_task)
    groups = [todo[i::max(1, min(tasks, len(todo)))] for i in range(max(1, min(tasks, len(todo))))]
    refs = [(group, task.remote([job for _, job in group])) for group in groups]
    for group, ref in refs:
        try:
            results = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - a lost task fails its cells' probes, not the study
            last = (str(e).strip().splitlines() or [""])[-1]  # a Ray traceback's last line is the error
            results = [{"reason": f"probe task failed: {type(e).__name__}: {last[:300]}"}] * len(group)
        for (c, _), res in zip(group, results):
            c.update(res)


def matrix(cells: list[dict], methods: Sequence[str], policies: Sequence[str], key: str) -> list[list[float]]:
    """``len(methods) x len(policies)`` values of ``key``; NaN where a cell has none."""
    at = {(c["method"], c["policy"]): c.get(key) for c in cells}
    return [[float(at[(m, p)]) if isinstance(at.get((m, p)), (int, float)) else math.nan for p in policies]
            for m in methods]


def _fmt(v: float, spec: str) -> str:
    return spec.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def to_markdown(cells: list[dict], methods: Sequence[str], policies: Sequence[str], title: str = "") -> str:
    out = [f"## {title}", ""] if title else []
    for key, head, spec in MATRIX:
        out += [f"### {head}", "", "| method | " + " | ".join(policies) + " |",
                "| --- | " + " | ".join("---:" for _ in policies) + " |"]
        for m, row in zip(methods, matrix(cells, methods, policies, key)):
            out.append(f"| {m} | " + " | ".join(_fmt(v, spec) for v in row) + " |")
        out.append("")
    failed = [c for c in cells if c["status"] == "failed" or c.get("reason")]
    if failed:
        out += ["### cells with a problem", ""] + [f"- {c['method']} x {c['policy']}: {c['status']}, {c['reason']}"
                                                   for c in failed] + [""]
    return "\n".join(out)


def to_csv(cells: list[dict], methods: Sequence[str], policies: Sequence[str]) -> str:
    order = {(m, p): i for i, (m, p) in enumerate((m, p) for m in methods for p in policies)}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for c in sorted(cells, key=lambda c: order.get((c["method"], c["policy"]), len(order))):
        w.writerow(["" if c.get(k) is None else c.get(k) for k in CSV_COLUMNS])
    return buf.getvalue()


def heatmap(cells: list[dict], methods: Sequence[str], policies: Sequence[str], title: str = ""):
    from . import plots

    panels, fmt = {}, {}
    for key, head, spec in MATRIX:
        m = matrix(cells, methods, policies, key)
        if key == "peak_gpu_mem_mb" and not any(math.isfinite(v) for row in m for v in row):
            continue  # a CPU study has no GPU memory to show
        panels[head], fmt[head] = m, spec
    return plots.heatmaps(panels, list(methods), list(policies), title=title, fmt=fmt)


def write_outputs(cells: list[dict], methods: Sequence[str], policies: Sequence[str], out_dir: Path,
                  title: str) -> dict[str, str]:
    from . import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": out_dir / "matrix.csv", "markdown": out_dir / "matrix.md", "heatmap": out_dir / "heatmap.png"}
    files["csv"].write_text(to_csv(cells, methods, policies))
    files["markdown"].write_text(to_markdown(cells, methods, policies, title))
    fig = heatmap(cells, methods, policies, title)
    fig.savefig(files["heatmap"], dpi=110, bbox_inches="tight")
    plots.close(fig)
    return {k: str(v) for k, v in files.items()}


def link_child_runs(sweep, cells: list[dict]) -> None:
    """``cell["run_id"]``: the MLflow child run of each cell's trial (before the matrix files are written,
    so matrix.csv links every row to its run)."""
    from .tracking import Tracker
    from .tune.mlflow_callback import PARENT_TAG, TRIAL_TAG

    c = Tracker(sweep.tracking_uri, sweep.parent_run_id).client
    exp_id = c.get_run(sweep.parent_run_id).info.experiment_id
    children = {r.data.tags.get(TRIAL_TAG): r.info.run_id
                for r in c.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{sweep.parent_run_id}'")}
    for cell in cells:
        if cell["trial_id"] in children:
            cell["run_id"] = children[cell["trial_id"]]


def log_study(sweep, cells: list[dict], methods: Sequence[str], policies: Sequence[str], files: dict[str, str]) -> None:
    """Child runs get their cell's name, tags and probe metrics; the parent the matrix files."""
    from .tracking import Tracker

    parent = Tracker(sweep.tracking_uri, sweep.parent_run_id)
    for cell in cells:
        if not cell.get("run_id"):
            continue
        child = Tracker(sweep.tracking_uri, cell["run_id"])
        child.set_tags({"mlflow.runName": f"{sweep.spec.name}-{cell['method']}-{cell['policy']}",
                        f"{STUDY_TAG}.method": cell["method"], f"{STUDY_TAG}.policy": cell["policy"]})
        child.log_metrics({f"probe_{k}": cell[k] for k in ("linear_top1", "linear_top5", "linear_macro_f1",
                                                            "knn_top1", "knn_top5") if k in cell})
        child.log_metrics({k: cell[k] for k in ("train_seconds", "peak_gpu_mem_mb", "peak_rss_mb") if k in cell})
        if isinstance(cell.get("wall_seconds"), (int, float)):  # the name `sslray compare` reads as wall time
            child.log_metrics({"train_wall_seconds": cell["wall_seconds"]})
    parent.set_tags({STUDY_TAG: sweep.spec.name})
    # The grid's own axes (grid_axes), the same on every resume: MLflow refuses to change a logged param.
    parent.log_params({"study.methods": ",".join(methods), "study.policies": ",".join(policies)})
    parent.log_metrics({"cells": len(cells), "cells_failed": sum(x["status"] == "failed" for x in cells)})
    parent.log_artifact(files["csv"], "study")
    parent.log_artifact(files["markdown"], "study")
    parent.log_artifact(files["heatmap"], "study")


def run_study(spec, methods: Sequence[str], policies: Sequence[str], tracking_uri: str | None = None,
              experiment: str = "sslray-study", probe_train_subset: int = 0, probe_val_subset: int = 0,
              verbose: int = 1) -> StudyResult:
    from .tune.sweep import run_sweep

    sweep = run_sweep(spec, tracking_uri=tracking_uri, experiment=experiment, verbose=verbose)
    ran = grid_axes(sweep.spec)
    if ran != (list(methods), list(policies)):
        print(f"sslray study: {sweep.spec.name} resumed its own grid: --methods {','.join(ran[0])} --views "
              f"{','.join(ran[1])} (this command asked for --methods {','.join(methods)} --views "
              f"{','.join(policies)}; a new --name starts another study)")
    methods, policies = ran
    cells = collect_cells(sweep)
    probe_cells(cells, sweep.sweep_dir, sweep.spec.gpus_per_worker, probe_train_subset, probe_val_subset,
                tasks=max(1, sweep.spec.max_concurrent))
    base = from_dict(sweep.spec.base)
    title = (f"study {sweep.spec.name}: {base.model.backbone}, {sweep.spec.max_epochs} epoch(s), "
             f"{Path(base.data.train).name}")
    link_child_runs(sweep, cells)
    files = write_outputs(cells, methods, policies, Path(sweep.sweep_dir) / "study", title)
    log_study(sweep, cells, methods, policies, files)
    return StudyResult(cells, list(methods), list(policies), sweep.parent_run_id, sweep.tracking_uri, files, sweep)


# ---------------------------------------------------------------------------------------- the CLI

def register(sub) -> None:
    s = sub.add_parser("study", help="methods x view policies as a Ray Tune grid; matrix of linear/kNN top-1, "
                                     "time and memory in MLflow", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--methods", required=True, help="comma list of SSL methods, e.g. simclr,byol,barlowtwins")
    s.add_argument("--views", default=DEFAULT_VIEWS,
                   help="comma list of view policies: default, simclr, orthogonality, lorot, dcl, mae")
    s.add_argument("--data", required=True, help="training .beton")
    s.add_argument("--val", required=True, help="labelled val .beton (kNN monitor and probes)")
    s.add_argument("--epochs", type=int, required=True, help="epochs of every cell")
    s.add_argument("--recipe", help="one shared base recipe for every method (default: each method's own "
                                    "<method>_cifar10 recipe)")
    s.add_argument("--backbone", help="timm backbone for every cell")
    s.add_argument("--batch-size", type=int, help="global batch of every cell")
    s.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per cell")
    s.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 if the cluster has GPUs, else 0")
    s.add_argument("--max-concurrent", type=int, default=0, help="0: as many cells as the cluster fits")
    s.add_argument("--probe-train-subset", type=int, default=0, help="train images for the probe (0: as training)")
    s.add_argument("--probe-val-subset", type=int, default=0, help="val images for the probe (0: as data.val_subset)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--name", required=True, help="study name; rerun with the same --name/--storage to resume")
    s.add_argument("--storage", default="./runs", help="folder (local or shared) for trial state and checkpoints")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    s.add_argument("--experiment", default="sslray-study", help="MLflow experiment")
    s.add_argument("--quiet", action="store_true", help="no live trial table")
    s.add_argument("overrides", nargs="*", metavar="[METHOD:]section.key=value",
                   help="config keys for every cell, or with METHOD: for that method's cells only")
    s.set_defaults(func=cmd_study)


def cmd_study(a) -> int:
    from .raytrain.methods import METHODS, check_method_config, import_plugins
    from .raytrain.trainer import check_data

    methods, policies = _names(a.methods), _names(a.views)
    import_plugins(load_config(None, [o for o in a.overrides if ":" not in o.split("=")[0]]).method.plugins)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS.names())}")
    check_policies(policies)
    check_scopes(methods, a.overrides)
    flags = {"data.train": _abs(a.data), "data.val": _abs(a.val), "train.epochs": a.epochs,
             "model.backbone": a.backbone, "data.batch_size": a.batch_size, "ray.num_workers": a.workers_per_trial,
             "train.seed": a.seed}
    fixed = [f"{k}={v}" for k, v in flags.items() if v is not None]
    cfgs = {m: method_config(m, a.recipe, fixed + list(a.overrides)) for m in methods}
    for cfg in cfgs.values():  # what a cell's workers would refuse, before Ray starts (each recipe has its batch)
        check_data(cfg)
        check_method_config(cfg)
    gpus = a.gpus_per_worker
    if gpus is None:
        from .tune.sweep import default_gpus_per_worker

        gpus = default_gpus_per_worker("sslray study")
    gpu = f"ray.use_gpu={'true' if gpus > 0 else 'false'}"  # before the overrides: a ray.use_gpu there wins
    cfgs = {m: method_config(m, a.recipe, fixed + [gpu] + list(a.overrides)) for m in methods}
    spec = make_study_spec(cfgs, policies, name=a.name, storage=a.storage, gpus_per_worker=gpus,
                           max_concurrent=a.max_concurrent, seed=a.seed)
    print(f"sslray study: {len(methods)} method(s) x {len(policies)} view polic{'y' if len(policies) == 1 else 'ies'}"
          f" = {len(methods) * len(policies)} cell(s), {a.epochs} epoch(s) each")
    res = run_study(spec, methods, policies, tracking_uri=a.tracking_uri, experiment=a.experiment,
                    probe_train_subset=a.probe_train_subset, probe_val_subset=a.probe_val_subset,
                    verbose=0 if a.quiet else 1)
    print(Path(res.files["markdown"]).read_text())
    for kind, path in res.files.items():
        print(f"sslray study: {kind}: {path}")
    print(f"sslray study: MLflow parent run {res.parent_run_id} in {res.tracking_uri}")
    # 1 when a cell failed to train or its probe failed (both listed under "cells with a problem").
    return 0 if not any(c["status"] == "failed" or c.get("reason") for c in res.cells) else 1


__all__ = ["PeakMemorySession",  # noqa: F822 (made on first use by the module's __getattr__)
           "StudyResult", "make_study_spec", "method_config", "run_study", "study_train_func"]
