"""Evaluation protocols beyond the per-epoch monitor: linear, kNN, low-shot, t-SNE and fine-tuning.

``run_eval(checkpoint, train, val, "linear,knn")`` -> ``EvalReport``; ``log_eval(tracker, report)``
writes it to the pretraining run. The scikit-learn protocols share frozen features cached per
checkpoint (``features.FeatureStore``); ``finetune`` runs on Ray Train (``sslray.raytrain.finetune``).
"""

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

__all__ = ["FeatureStore", "Features", "stratified_indices", "PROTOCOLS", "EvalContext", "ProtocolResult",
           "parse_protocols", "register_protocol", "EvalReport", "find_run", "format_eval_table", "log_eval", "run_eval"]
