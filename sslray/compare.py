"""`sslray compare`: one table, three figures and a summary MLflow run for the runs of an experiment.

Every number is read back from MLflow (params, the latest value of each metric, per-epoch histories),
so the table shows what the UI shows. The CSV keeps MLflow's floats unrounded; the terminal and the
Markdown table round them for reading.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .tracking import (
    KIND_TAG,
    SWEEP_PARENT_TAG,
    RunRecord,
    Tracker,
    folder_name,
    metric_histories,
    resolve_uri,
    search_runs,
)

FAMILY_TAG = "sslray.family"
# Families whose loss has a softmax temperature (``method.temperature``); MIM has a mask ratio instead,
# and the non-contrastive methods (BYOL, SimSiam, Barlow Twins, VICReg) have neither.
TEMPERATURE_FAMILIES = ("contrastive", "clustering", "distillation")


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def family_of(method: str, tags: dict) -> str:
    """The registry's family for ``method``; the run's ``sslray.family`` tag for methods not registered here."""
    from .raytrain.methods import METHODS

    if method in METHODS:
        fam = getattr(METHODS.get(method), "family", None)
        if fam:
            return fam
    return tags.get(FAMILY_TAG, "unknown")


def knob(method: str, family: str, params: dict) -> str:
    """The one hyper-parameter the families are most sensitive to: softmax temperature or mask ratio."""
    if "method.params.mask_ratio" in params:
        return f"mask {_num(params['method.params.mask_ratio']):g}"
    if family == "MIM":
        import inspect

        from .raytrain.methods import METHODS

        if method in METHODS:
            p = inspect.signature(METHODS.get(method)).parameters.get("mask_ratio")
            if p is not None and p.default is not inspect.Parameter.empty:
                return f"mask {p.default:g}"
        return "-"
    if family in TEMPERATURE_FAMILIES:
        t = params.get("method.params.temperature", params.get("method.temperature"))
        return f"T={_num(t):g}" if t is not None else "-"
    return "-"


def _pct(v: float) -> str:
    return "" if math.isnan(v) else f"{100 * v:.1f}%"


def _pts(v: float) -> str:
    return "" if math.isnan(v) else f"{100 * v:+.1f} pts"


def _duration(v: float) -> str:
    if math.isnan(v):
        return ""
    return f"{v:.0f} s" if v < 600 else (f"{v / 60:.1f} min" if v < 7200 else f"{v / 3600:.1f} h")


def _g(v: float) -> str:
    return "" if isinstance(v, float) and math.isnan(v) else f"{v:g}"


@dataclass(frozen=True)
class Column:
    key: str  # CSV header
    header: str  # terminal / Markdown header
    get: Callable[[RunRecord, str], Any]  # (run, family) -> raw value
    fmt: Callable[[Any], str] = str
    numeric: bool = False


# Where each probe column reads from, first present wins: `sslray probe` logs probe_* / gain_*,
# `sslray eval` logs eval_* / eval_gain_* (kNN at k=200, the monitor's k).
SOURCES = {"knn_top1": ("probe_knn_top1", "eval_knn_k200_top1"),
           "linear_top1": ("probe_linear_top1", "eval_linear_top1"),
           "macro_f1": ("probe_linear_macro_f1", "eval_linear_macro_f1"),
           "gain_linear_top1": ("gain_linear_top1", "eval_gain_linear_top1")}


def source_metric(r: "RunRecord", key: str) -> str:
    """The MLflow metric a probe column shows for this run: the first of ``SOURCES[key]`` it holds a
    number for (a probe re-run without its baseline leaves ``gain_*`` NaN, and eval's may hold one)."""
    return next((m for m in SOURCES[key] if not math.isnan(_num(r.metrics.get(m)))), SOURCES[key][0])


def _metric(r: "RunRecord", key: str) -> float:
    return _num(r.metrics.get(source_metric(r, key)))


def _batch(r: "RunRecord") -> float:
    """Images per optimizer step: the batch data.auto_batch settled on (else the configured one) times the
    accumulated micro-batches, the batch the run's lr and schedule were set for."""
    batch = r.metrics.get("global_batch", r.params.get("data.batch_size"))
    return _num(batch) * _num(r.metrics.get("accum_steps", r.params.get("train.accum_steps", 1)))


COLUMNS: tuple[Column, ...] = (
    Column("run", "run", lambda r, f: r.name),
    Column("method", "method", lambda r, f: r.params.get("method.name") or r.tags.get("sslray.method", "")),
    Column("family", "family", lambda r, f: f),
    Column("backbone", "backbone", lambda r, f: r.params.get("model.backbone") or r.tags.get("sslray.backbone", "")),
    Column("epochs", "epochs", lambda r, f: _num(r.params.get("train.epochs")), lambda v: _g(v), True),
    Column("global_batch", "global batch", lambda r, f: _batch(r), _g, True),
    Column("base_lr", "lr (per 256)", lambda r, f: _num(r.params.get("optim.base_lr")), _g, True),
    Column("temperature_or_mask", "T / mask ratio",
           lambda r, f: knob(r.params.get("method.name", ""), f, r.params)),
    Column("knn_top1", "kNN top-1", lambda r, f: _metric(r, "knn_top1"), _pct, True),
    Column("linear_top1", "linear top-1", lambda r, f: _metric(r, "linear_top1"), _pct, True),
    Column("macro_f1", "macro F1", lambda r, f: _metric(r, "macro_f1"),
           lambda v: "" if math.isnan(v) else f"{v:.3f}", True),
    Column("gain_linear_top1", "gain vs random init", lambda r, f: _metric(r, "gain_linear_top1"), _pts, True),
    Column("wall_seconds", "wall time", lambda r, f: _num(r.metrics.get("train_wall_seconds")), _duration, True),
    Column("images_per_sec", "images/s", lambda r, f: _num(r.metrics.get("images_per_sec")),
           lambda v: "" if math.isnan(v) else f"{v:.0f}", True),
)

# Which MLflow metric each numeric column shows (the test checks the table against MLflow through this).
METRIC_OF = {"knn_top1": "probe_knn_top1", "linear_top1": "probe_linear_top1", "macro_f1": "probe_linear_macro_f1",
             "gain_linear_top1": "gain_linear_top1", "wall_seconds": "train_wall_seconds",
             "images_per_sec": "images_per_sec"}


def build_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One dict per run (CSV keys plus ``run_id``), ordered by family, method, then start time."""
    rows = []
    for r in runs:
        # A sweep's or study's parent run holds a summary, not a training run: its trials/cells are the rows.
        if "sslray.study" in r.tags or r.tags.get(SWEEP_PARENT_TAG) == "true":
            continue
        method = r.params.get("method.name") or r.tags.get("sslray.method", "")
        fam = family_of(method, r.tags)
        row = {"run_id": r.run_id, **{c.key: c.get(r, fam) for c in COLUMNS}, "_start": r.start_time}
        rows.append(row)
    rows.sort(key=lambda x: (x["family"], x["method"], x["_start"]))
    for row in rows:
        del row["_start"]
    return rows


def _id_prefix(rid: str, others: Sequence[str]) -> str:
    """``rid``'s first 6 characters, more where another of ``others`` starts the same way."""
    n = 6
    while n < len(rid) and any(o != rid and o[:n] == rid[:n] for o in others):
        n += 2
    return rid[:n]


def labels(rows: Sequence[dict]) -> list[str]:
    """Plot labels: each run's name, as the table's ``run`` column shows it. Where runs share a name, the
    method, then the temperature / mask ratio, is added where it tells them apart, then the run id prefix
    where still ambiguous. A run without a name is its method and run id prefix."""
    ids = [r["run_id"] for r in rows]
    out = [r["run"] or (f"{r['method']} ({_id_prefix(r['run_id'], ids)})" if r["method"]
                        else _id_prefix(r["run_id"], ids)) for r in rows]
    for extra, always in ((lambda r: r["method"], False), (lambda r: r["temperature_or_mask"], False),
                          (lambda r: _id_prefix(r["run_id"], ids), True)):
        groups: dict[str, list[int]] = {}
        for i, o in enumerate(out):
            groups.setdefault(o, []).append(i)
        for o, idx in groups.items():
            if len(idx) > 1 and (always or len({extra(rows[i]) for i in idx}) > 1):
                for i in idx:
                    out[i] = f"{o} ({extra(rows[i])})"
    return out


def rich_table(rows: Sequence[dict], title: str):
    from rich.table import Table

    t = Table(title=title)
    for c in COLUMNS:
        t.add_column(c.header, justify="right" if c.numeric else "left", overflow="fold", no_wrap=c.key == "run")
    for row in rows:
        t.add_row(*[c.fmt(row[c.key]) for c in COLUMNS])
    return t


def markdown_table(rows: Sequence[dict]) -> str:
    head = "| " + " | ".join(c.header for c in COLUMNS) + " |"
    rule = "|" + "|".join("---:" if c.numeric else "---" for c in COLUMNS) + "|"
    body = ["| " + " | ".join(c.fmt(row[c.key]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body]) + "\n"


def write_csv(rows: Sequence[dict], path: Path) -> None:
    keys = ["run_id"] + [c.key for c in COLUMNS]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in rows:  # repr keeps every float exactly as MLflow returned it; NaN becomes empty
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else repr(v) if isinstance(v, float) else v)
                        for k, v in row.items()})


def figures(rows: Sequence[dict], uri: str) -> dict[str, Any]:
    """``{file name: matplotlib figure}``: loss and kNN against epoch per run, final probe metrics by family."""
    from . import plots

    labs = labels(rows)
    hist = {r["run_id"]: metric_histories(uri, r["run_id"], ("loss", "knn_top1")) for r in rows}
    figs = {
        "loss_curves.png": plots.panels({lab: hist[r["run_id"]]["loss"] for lab, r in zip(labs, rows)},
                                        "training loss per run", "loss"),
        "knn_curves.png": plots.overlay({lab: hist[r["run_id"]]["knn_top1"] for lab, r in zip(labs, rows)},
                                        "kNN top-1 (val) against epoch", "kNN top-1"),
        "probe_by_family.png": plots.bars_by_group(
            labs, [r["family"] for r in rows],
            {"kNN top-1": [r["knn_top1"] for r in rows], "linear top-1": [r["linear_top1"] for r in rows],
             "macro F1": [r["macro_f1"] for r in rows]},
            "final probe metrics (frozen backbone), grouped by family"),
    }
    return figs


@dataclass
class CompareResult:
    rows: list[dict]
    out: Path
    files: list[Path]
    summary_run_id: Optional[str]


def compare(experiment: str, run_ids: Optional[list[str]] = None, out: Optional[str] = None,
            tracking_uri: Optional[str] = None, log: bool = True, print_table: bool = True) -> CompareResult:
    from rich.console import Console

    from . import plots

    uri = resolve_uri(tracking_uri)
    runs = search_runs(uri, experiment, run_ids)
    if not runs:
        raise ValueError(f"experiment {experiment!r} has no finished sslray runs to compare")
    rows = build_rows(runs)
    out_dir = Path(out or Path("compare") / folder_name(experiment)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if print_table:
        Console(width=None if sys.stdout.isatty() else 240).print(rich_table(rows, f"sslray compare: {experiment} ({len(rows)} runs)"))
    files = [out_dir / "compare.csv", out_dir / "compare.md"]
    write_csv(rows, files[0])
    files[1].write_text(markdown_table(rows))
    for name, fig in figures(rows, uri).items():
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        plots.close(fig)
        files.append(out_dir / name)
    summary = None
    if log:
        t = Tracker.start(uri, experiment, f"compare-{experiment}-{time.strftime('%Y%m%d-%H%M%S')}",
                          tags={KIND_TAG: "compare", "sslray.compared_runs": ",".join(r["run_id"] for r in rows)[:5000]})
        t.log_params({"compare.experiment": experiment, "compare.num_runs": len(rows)})
        for f in files:
            t.log_artifact(f)
        t.end()
        summary = t.run_id
    for f in files:
        print(f"sslray compare: wrote {f}")
    if summary:
        print(f"sslray compare: logged to MLflow run {summary} (tag {KIND_TAG}=compare) in {uri}")
    return CompareResult(rows, out_dir, files, summary)


def cmd_compare(a) -> int:
    compare(a.experiment, a.runs, a.out, a.tracking_uri, log=not a.no_log)
    return 0


def register(sub) -> None:
    c = sub.add_parser("compare", help="table + figures comparing the runs of an MLflow experiment")
    c.add_argument("--experiment", required=True, help="MLflow experiment name")
    c.add_argument("--runs", nargs="+", metavar="ID", help="only these run ids (a unique prefix is enough)")
    c.add_argument("--out", help="folder for compare.csv, compare.md and the PNGs (default compare/<experiment>)")
    c.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    c.add_argument("--no-log", action="store_true", help="do not log a summary run to MLflow")
    c.set_defaults(func=cmd_compare)
