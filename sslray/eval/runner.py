"""`sslray eval`: run protocols on a checkpoint, log them to its pretraining MLflow run, print one table."""

from __future__ import annotations

import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..raytrain.evaluate import find_state
from ..storage import RUN_FILE
from .features import FeatureStore
from .protocols import PROTOCOLS, EvalContext, ProtocolResult, check_settings, parse_protocols, reads_features
from .source import TIMM_PREFIX, SourceOptions, resolve_source, source_kind


@dataclass
class EvalReport:
    checkpoint: str
    results: list[ProtocolResult]
    features: dict = field(default_factory=dict)  # init -> {"path": cache file, "from_cache": bool}

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: ``eval_<m>`` (pretrained), ``eval_random_init_<m>`` and ``eval_gain_<m>`` (none of
        the last two for a protocol run without its baseline)."""
        out: dict[str, float] = {}
        for r in self.results:
            out.update({f"eval_{k}": v for k, v in r.pretrained.items()})
            out.update({f"eval_random_init_{k}": v for k, v in r.random_init.items()})
            out.update({f"eval_gain_{k}": v for k, v in r.gain().items()})
        return out

    def summary(self) -> dict:
        return {"checkpoint": self.checkpoint, "features": self.features,
                "protocols": {r.name: _entry(r) for r in self.results}}


def _entry(r: ProtocolResult) -> dict:
    """A protocol's summary entry; without a baseline it says so instead of holding empty or NaN numbers."""
    if not r.random_init:
        return {"pretrained": r.pretrained, "baseline": BASELINE_SKIPPED, "info": r.info}
    return {"pretrained": r.pretrained, "random_init": r.random_init, "gain": r.gain(), "info": r.info}


BASELINE_SKIPPED = "random-init baseline skipped (--no-baseline)"


SOURCE_KINDS = {"export": "an exported backbone", "timm": "a timm model"}  # source_kind's, said in messages


def find_run(checkpoint: str) -> Optional[dict]:
    """The ``{"run_id", "tracking_uri"}`` that ``sslray pretrain`` recorded for the run holding this
    checkpoint (``sslray_run.json`` in the run folder), or None (always for an export or a
    ``timm:<name>`` source: an export may sit in a run folder, but a run's metrics are its checkpoint's)."""
    if source_kind(checkpoint) != "checkpoint":
        return None
    p = find_state(checkpoint).resolve().parent
    for d in (p, *p.parents):
        f = d / RUN_FILE
        if f.exists():
            try:
                return json.loads(f.read_text())
            except (OSError, ValueError):
                return None
    return None


def run_eval(checkpoint: str, train: Optional[str], val: Optional[str], protocols: str | Sequence[str], *,
             train_subset: int = 0, val_subset: int = 0, use_gpu: str = "auto", batch_size: int = 512,
             cache_dir: Optional[str] = None, cache: bool = True, progress: bool = True,
             log: Callable[[str], None] = print, store: Optional[FeatureStore] = None,
             source: Optional[SourceOptions] = None, **ctx_kw) -> EvalReport:
    """Run ``protocols`` (names or ``"linear,knn"``) on ``checkpoint``: an sslray checkpoint, an export
    folder or ``timm:<name>`` (``source``: ``--weights``, the eval transform; see ``sslray.eval.source``).
    ``train``/``val`` default to a checkpoint's own ``data.train``/``data.val``; ``ctx_kw`` sets
    ``EvalContext`` fields (knn_ks, ...).

    ``store``: a ``FeatureStore`` of this checkpoint, data, subsets and device (``shared_store``) whose
    features and linear fits the protocols take as they are; ``batch_size`` and the cache settings are
    then the store's."""
    names = parse_protocols(protocols)  # unknown names fail before any work
    check_settings(names, **ctx_kw)
    if store is not None:
        if source is not None:  # the store's source was resolved when it was made; these would go unused
            raise ValueError("run_eval: give source= (--weights, the eval transform) to the FeatureStore, not "
                             "beside a store")
        store.serves(checkpoint, train or store.train, val or store.val, train_subset=train_subset,
                     val_subset=val_subset, use_gpu=use_gpu)
        return _run(store, names, log, ctx_kw)
    kind = source_kind(checkpoint)
    trained = [n for n in names if not reads_features(n)]  # finetune, linear_sgd: Ray-trained from a checkpoint
    if trained and kind != "checkpoint":
        raise ValueError(f"--protocol {','.join(trained)}: {checkpoint} is {SOURCE_KINDS[kind]}, not an sslray "
                         "checkpoint: these protocols rebuild the method and its training settings from a "
                         "checkpoint's config (a state.pt of sslray pretrain); the frozen-feature protocols "
                         "(linear, knn, lowshot, embed) score any source")
    if (not train or not val) and kind != "checkpoint":
        raise ValueError(f"--train and --val are needed for {checkpoint}: only an sslray checkpoint names its "
                         "data (data.train / data.val in its config)")
    enc = resolve_source(checkpoint, source, data=(train, val))  # the checkpoint is read once, here
    if not train or not val:  # a checkpoint (the others were refused above): its own splits
        cfg = enc.cfg
        for role, given, key in (("train", train, cfg.data.train), ("val", val, cfg.data.val)):
            if not given and not key:
                raise ValueError(f"no --{role} split given and the checkpoint's config key 'data.{role}' is empty")
        train, val = train or cfg.data.train, val or cfg.data.val
    store = FeatureStore(enc, train, val, train_subset=train_subset, val_subset=val_subset, use_gpu=use_gpu,
                         batch_size=batch_size, cache_dir=cache_dir, cache=cache, progress=progress, log=log)
    return _run(store, names, log, ctx_kw)


def _run(store: FeatureStore, names: Sequence[str], log: Callable[[str], None], ctx_kw: dict) -> EvalReport:
    ctx = EvalContext(store, log=log, **ctx_kw)
    results = []
    for name in names:
        log(f"eval: protocol {name} ...")
        results.append(PROTOCOLS.get(name)(ctx))
    feats = {init: {"path": str(f.path) if f.path else None, "from_cache": f.from_cache}
             for init, f in store._mem.items()}
    return EvalReport(store.source.label, results, feats)


def shared_store(checkpoint: str, train: str, val: str, protocols: str | Sequence[str], *, train_subset: int = 0,
                 val_subset: int = 0, use_gpu: str = "auto") -> Optional[FeatureStore]:
    """The store ``run_eval`` would build for these arguments, for ``sslray pretrain --eval`` to hand to its
    end-of-run probe first and then to ``run_eval``: the probe's frozen features and linear fits are the
    protocols' (extracted and fitted once, one figure per metric). None when no protocol reads features
    (``finetune`` alone), so that no feature cache is written for nothing."""
    if not any(reads_features(n) for n in parse_protocols(protocols)):
        return None
    return FeatureStore(checkpoint, train, val, train_subset=train_subset, val_subset=val_subset, use_gpu=use_gpu)


SUMMARY_JSON, SUMMARY_MD, PROTOCOLS_TAG = "eval/summary.json", "eval/summary.md", "sslray.eval_protocols"


def _logged_summary(tracker) -> tuple[dict, list[str]]:
    """The ``eval/summary.json`` and the protocols tag an earlier ``log_eval`` left on the run
    (``({}, [])`` when there are none). A summary that cannot be read is reported and not merged."""
    from mlflow.exceptions import MlflowException

    c = tracker.client
    try:
        tag = c.get_run(tracker.run_id).data.tags.get(PROTOCOLS_TAG, "")
    except MlflowException:
        tag = ""
    tagged = [t for t in (x.strip() for x in tag.split(",")) if t]
    try:
        if SUMMARY_JSON not in {f.path for f in c.list_artifacts(tracker.run_id, "eval")}:
            return {}, tagged
        with tempfile.TemporaryDirectory() as d:
            summary = json.loads(Path(c.download_artifacts(tracker.run_id, SUMMARY_JSON, d)).read_text())
        if not isinstance(summary, dict) or not isinstance(summary.get("protocols", {}), dict):
            raise TypeError("not an sslray eval summary")
        return summary, tagged
    except (MlflowException, OSError, TypeError, ValueError) as e:
        print(f"sslray: warning: the run's {SUMMARY_JSON} could not be read ({e}); it is replaced by this "
              "call's protocols", file=sys.stderr)
        return {}, tagged


def merged_summary(earlier: dict, report: EvalReport) -> dict:
    """``report``'s summary merged into the one an earlier call logged to the same run: the protocols this
    call ran replace theirs, the others are kept (each entry names the checkpoint it scored), in name order;
    ``checkpoint`` and ``features`` are this call's."""
    now = report.summary()
    protocols = dict(earlier.get("protocols") or {})
    for name, entry in now["protocols"].items():
        protocols[name] = {"checkpoint": report.checkpoint, **entry}
    return {**now, "protocols": {k: protocols[k] for k in sorted(protocols)}}


def superseded_metrics(earlier: dict, report: EvalReport) -> set[str]:
    """The metrics an earlier summary's entries logged for the protocols ``report`` runs again."""
    out = set()
    for r in report.results:
        entry = (earlier.get("protocols") or {}).get(r.name)
        if isinstance(entry, dict):
            for prefix, side in (("eval_", "pretrained"), ("eval_random_init_", "random_init"), ("eval_gain_", "gain")):
                out |= {prefix + k for k in _numbers_of(entry.get(side))}
    return out


def _numbers_of(side) -> dict[str, float]:
    """A summary entry's metrics read back from JSON (a number written as text by ``default=str`` too)."""
    out = {}
    for k, v in (side.items() if isinstance(side, dict) else ()):
        try:
            out[k] = v if isinstance(v, (int, float)) and not isinstance(v, bool) else float(v)
        except (TypeError, ValueError):
            continue
    return out


def _summary_report(summary: dict) -> EvalReport:
    """An ``EvalReport`` holding a (merged) summary's numbers: for its Markdown table."""
    results = [ProtocolResult(name, _numbers_of(e.get("pretrained")), _numbers_of(e.get("random_init")))
               for name, e in summary["protocols"].items() if isinstance(e, dict)]
    return EvalReport(summary.get("checkpoint", ""), results, summary.get("features") or {})


def log_eval(tracker, report: EvalReport) -> None:
    """Metrics on the run, plus ``eval/summary.json``, the table, and each protocol's texts and PNGs.

    A later call on the same run merges into what is there: the summary, its table and the
    ``sslray.eval_protocols`` tag hold every protocol logged to the run so far (a protocol run again
    replaces its earlier entry), as the run's metrics do: an earlier metric of a protocol run again that
    this call does not log (its baseline and gains after ``--no-baseline``, a k no longer asked for) is
    cleared, so no pretrained number sits beside a baseline of another call."""
    earlier, tagged = _logged_summary(tracker)
    metrics = report.metrics()
    tracker.log_metrics(metrics)
    stale = superseded_metrics(earlier, report) - {k for k, v in metrics.items() if math.isfinite(v)}
    if stale:
        tracker.clear_metrics(stale)
    summary = merged_summary(earlier, report)
    names = sorted(set(tagged) | set(summary["protocols"]))
    tracker.set_tags({PROTOCOLS_TAG: ",".join(names)})
    tracker.log_text(json.dumps(summary, indent=2, default=str), SUMMARY_JSON)
    tracker.log_text(format_eval_table(_summary_report(summary), markdown=True), SUMMARY_MD)
    for r in report.results:
        for name, text in r.texts.items():
            tracker.log_text(text, f"eval/{name}")
        for name, fig in r.figures.items():
            tracker.log_figure(fig, f"eval/{name}")


def close_figures(report: EvalReport) -> None:
    from .. import plots

    for r in report.results:
        for fig in r.figures.values():
            plots.close(fig)


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}%"


def _cell(k: str, v: float, side: dict) -> str:
    if k.endswith("_mean"):
        return _pm(v, side.get(k[: -len("_mean")] + "_std", 0.0))
    if k.endswith("_c"):  # a chosen C
        return f"C={v:g}"
    return f"{v:.3f}" if "silhouette" in k else f"{100 * v:.2f}%"


def _gain_cell(k: str, g: float) -> str:
    return f"{g:+.3f}" if "silhouette" in k else f"{100 * g:+.2f} pts"


def _rows(report: EvalReport) -> list[tuple[str, Optional[str], str, Optional[str]]]:
    """(metric, random init, pretrained, gain); random init and gain are None for a protocol run without
    its baseline."""
    rows = []
    for r in report.results:
        gains = r.gain()
        for k, p in r.pretrained.items():
            if k.endswith(("_std", "_runs")) or (r.random_init and k not in r.random_init):
                continue
            name = k[: -len("_mean")] if k.endswith("_mean") else k
            if not r.random_init:
                rows.append((name, None, _cell(k, p, r.pretrained), None))
                continue
            rows.append((name, _cell(k, r.random_init[k], r.random_init), _cell(k, p, r.pretrained),
                         _gain_cell(k, gains[k]) if k in gains else ""))
    return rows


def format_eval_table(report: EvalReport, markdown: bool = False) -> str:
    """The protocols' numbers, one row per metric. Rows without a baseline read "skipped" under random init;
    when no protocol has one, the random init and gain columns are left out and a note says why."""
    rows = _rows(report)
    if rows and all(r[1] is None for r in rows):
        cols, rows, note = ("metric", "pretrained"), [(r[0], r[2]) for r in rows], BASELINE_SKIPPED
    else:
        cols, note = ("metric", "random init", "pretrained", "gain"), ""
        rows = [(m, "skipped" if rnd is None else rnd, p, "" if g is None else g) for m, rnd, p, g in rows]
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows] + ([f"\n{note}"] if note else [])) + "\n"
    from rich.console import Console
    from rich.table import Table

    src = report.checkpoint
    name = src.split()[0] if src.startswith(TIMM_PREFIX) else Path(src).parent.name
    t = Table(title=f"eval protocols on the val split: {name}", caption=note or None)
    for c in cols:
        t.add_column(c, justify="left" if c == "metric" else "right")
    for r in rows:
        t.add_row(*r)
    console = Console(width=110, record=True)
    with console.capture() as cap:
        console.print(t)
    return cap.get()
