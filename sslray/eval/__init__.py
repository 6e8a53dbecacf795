"""Evaluation protocols beyond the per-epoch monitor: linear, kNN, low-shot, t-SNE and fine-tuning.

``run_eval(checkpoint, train, val, "linear,knn")`` -> ``EvalReport``; ``log_eval(tracker, report)``
writes it to the pretraining run. The scikit-learn protocols share frozen features cached per
checkpoint (``features.FeatureStore``); ``finetune`` runs on Ray Train (``sslray.raytrain.finetune``).

The names below are imported on first use (PEP 562 ``__getattr__``): ``sslray eval`` registers its
flags through ``sslray.eval.cli``, and importing this package must not load torch, timm or
scikit-learn just to build the command line parser.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_EXPORTS = {
    "Features": "features",
    "FeatureStore": "features",
    "stratified_indices": "lowshot",
    "PROTOCOLS": "protocols",
    "EvalContext": "protocols",
    "ProtocolResult": "protocols",
    "parse_protocols": "protocols",
    "register_protocol": "protocols",
    "EvalReport": "runner",
    "find_run": "runner",
    "format_eval_table": "runner",
    "log_eval": "runner",
    "run_eval": "runner",
}
_SUBMODULES = ("cli", "embed", "features", "lowshot", "protocols", "runner", "source")

__all__ = ["FeatureStore", "Features", "stratified_indices", "PROTOCOLS", "EvalContext", "ProtocolResult",
           "parse_protocols", "register_protocol", "EvalReport", "find_run", "format_eval_table", "log_eval", "run_eval"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from .features import Features, FeatureStore
    from .lowshot import stratified_indices
    from .protocols import (
        PROTOCOLS,
        EvalContext,
        ProtocolResult,
        parse_protocols,
        register_protocol,
    )
    from .runner import EvalReport, find_run, format_eval_table, log_eval, run_eval


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
