"""After a sweep: one row per trial (status, epochs, metric, sampled values, failure reason), the best
trial, and what the parent MLflow run keeps of it (results.csv, metric-vs-hyperparameter PNG, best config)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import Config, dump_yaml, effective_lr, from_dict
from ..tracking import Tracker
from .space import log_keys, trial_config
from .trial import failure_reason


def _error_text(result) -> str:
    p = Path(result.path) / "error.txt" if result.path else None
    if p is not None and p.exists():
        return p.read_text()
    return str(result.error)


def summarize(grid, spec) -> tuple[list[dict], dict | None]:
    """Rows from Tune's ResultGrid. status: completed (reached max_epochs), stopped_early (the
    scheduler stopped it), failed (with its reason). The best trial is the best final metric among
    completed trials (early-stopped trials were judged on fewer epochs); failing that, among all."""
    base = from_dict(spec.base)
    rows = []
    for result in grid:
        m = dict(result.metrics or {})
        trial_id = Path(result.path).name.removeprefix("trial_") if result.path else m.get("trial_id", "?")
        config = {k: v for k, v in (result.config or {}).items() if not k.startswith("_")}
        epochs = int(m.get("epoch", 0) or 0)
        row: dict[str, Any] = {"trial_id": trial_id, "config": config, "epochs": epochs}
        if result.error is not None:
            row["status"], row["reason"] = "failed", failure_reason(_error_text(result))
        else:
            row["status"] = "completed" if epochs >= spec.max_epochs else "stopped_early"
        for key in (spec.metric, "loss", "knn_top1", "knn_top5"):
            if isinstance(m.get(key), (int, float)):
                row[key] = float(m[key])
        df = result.metrics_dataframe
        if df is not None and spec.metric in getattr(df, "columns", ()):
            col = df[spec.metric].dropna()
            if len(col):
                row[f"best_{spec.metric}"] = float(col.max() if spec.mode == "max" else col.min())
        try:
            row["effective_lr"] = effective_lr(trial_config(base, config, spec.forced))
        except Exception:  # noqa: BLE001, S110 - a config that cannot be built failed the trial; it has a reason
            pass
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows, pick_best(rows, spec.metric, spec.mode)


def pick_best(rows: list[dict], metric: str, mode: str) -> dict | None:
    def ok(r):
        return isinstance(r.get(metric), float) and math.isfinite(r[metric])

    for pool in ([r for r in rows if r["status"] == "completed" and ok(r)],
                 [r for r in rows if r["status"] != "failed" and ok(r)]):
        if pool:
            return (max if mode == "max" else min)(pool, key=lambda r: r[metric])
    return None


def results_csv(rows: list[dict], metric: str) -> str:
    keys = sorted({k for r in rows for k in r["config"]})
    cols = ["trial_id", "status", "epochs", metric, f"best_{metric}", "loss", "effective_lr", *keys, "reason"]
    cols = list(dict.fromkeys(cols))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        flat = {**r, **r["config"]}
        w.writerow(["" if flat.get(c) is None else flat.get(c) for c in cols])
    return buf.getvalue()


def log_summary(parent: Tracker, spec, rows: list[dict], best: Mapping[str, Any] | None,
                best_cfg: Config | None) -> None:
    from .. import plots

    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped_early", "failed")}
    parent.log_metrics({"trials": len(rows), **{f"trials_{k}": v for k, v in counts.items()}})
    parent.log_text(results_csv(rows, spec.metric), "results.csv")
    fig = plots.metric_vs_params(rows, sorted({k for r in rows for k in r["config"]}), spec.metric,
                                 log_x=log_keys(spec.dists), title=f"{spec.name}: final {spec.metric} per trial")
    parent.log_figure(fig, f"{spec.metric}_vs_hparams.png")
    plots.close(fig)
    if best is None or best_cfg is None:
        parent.set_tags({"sslray.tune.best": "none (every trial failed)"})
        return
    parent.log_params({"best.trial_id": best["trial_id"], **{f"best.{k}": v for k, v in best["config"].items()},
                       "best.effective_lr": effective_lr(best_cfg)})
    parent.log_metrics({f"best_{k}": best[k] for k in (spec.metric, "loss", "knn_top1", "knn_top5")
                        if isinstance(best.get(k), float)})
    parent.log_text(dump_yaml(best_cfg), "best_config.yaml")
