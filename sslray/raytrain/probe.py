"""Offline linear probe: frozen features -> standardised -> scikit-learn LogisticRegression.

Reported beside the same probe on a randomly initialised backbone, so a user sees what
pretraining added. The solver gets enough iterations to converge; a ConvergenceWarning is turned
into a recorded flag instead of being lost in the log.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (accuracy_score, classification_report, confusion_matrix, f1_score, precision_score,
                             recall_score, top_k_accuracy_score)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits


def macro_scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Macro F1, precision and recall over the classes found in ``y`` or ``pred`` (scikit-learn's own
    default). A class with no val image and no prediction has nothing to score: counted as 0, it would
    cap a perfect classifier on a val subset holding 5 of 10 classes at 0.5. A prediction into a class
    with no val image still costs (that class scores 0)."""
    kw = {"average": "macro", "labels": np.union1d(y, pred), "zero_division": 0}
    return {"macro_f1": float(f1_score(y, pred, **kw)), "precision": float(precision_score(y, pred, **kw)),
            "recall": float(recall_score(y, pred, **kw))}


@dataclass
class ProbeResult:
    metrics: dict[str, float]
    report: str  # sklearn's per-class report
    confusion: np.ndarray
    converged: bool
    C: float = 1.0  # the inverse regularisation strength of the fit
    c_scores: dict[float, float] = field(default_factory=dict)  # candidate C -> held-out top-1 (several Cs only)


# Below this many feature values (images x dims) the solver runs on one BLAS thread: each L-BFGS
# iteration is a few small matrix products, and waking a thread pool for them costs more than it
# saves: 1.3-1.4x faster fits up to 5,000 x 512 on an idle 2-core machine, ~10x when other jobs share
# the cores (benchmarks/probe_fit.py, RESULTS.md). Larger fits keep the library's threads.
ONE_THREAD_BELOW = 10_000_000


def blas_threads(num_values: int) -> Optional[int]:
    """1 for a fit of ``num_values`` feature values under ``ONE_THREAD_BELOW``, else None (the default)."""
    return 1 if num_values < ONE_THREAD_BELOW else None


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 class_names: list[str], C: float = 1.0, max_iter: int = 3000, seed: int = 0,
                 threads: Union[int, None, str] = "auto") -> ProbeResult:
    """``threads``: BLAS threads of the fit; ``"auto"``: one for small fits (``blas_threads``), None: the
    library's default."""
    labels = np.arange(len(class_names))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, tol=1e-4, random_state=seed))
    limit = blas_threads(train_x.size) if threads == "auto" else threads
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=limit, user_api="blas"):
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(train_x, train_y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    proba = clf.predict_proba(val_x)
    pred = clf.classes_[proba.argmax(1)]
    # predict_proba columns follow clf.classes_; expand to every class so top-5 works on subsets.
    full = np.zeros((len(val_x), len(labels)))
    full[:, clf.classes_] = proba
    from .knn import top5_k  # torch is loaded wherever features were made

    k5 = top5_k(len(labels))
    metrics = {
        "top1": float(accuracy_score(val_y, pred)),
        "top5": float(top_k_accuracy_score(val_y, full, k=k5, labels=labels)) if k5 > 1
        else float(accuracy_score(val_y, pred)),
        **macro_scores(val_y, pred),
    }
    report = per_class_report(val_y, pred, class_names)
    return ProbeResult(metrics, report, confusion_matrix(val_y, pred, labels=labels), converged, float(C))


# Share of each class's train images held out to choose C among several: the val split scores the
# chosen probe and so must never choose it.
HOLDOUT = 0.1


class HoldoutError(ValueError):
    """No class has the 2 images a held-out split needs (one to fit, one to score)."""


def linear_cs(cs: Union[float, Sequence[float]], option: str = "--linear-c") -> tuple[float, ...]:
    """Candidate Cs ascending and without repeats (a fit cache keys on them); a ValueError naming ``option``
    unless each is a positive number."""
    raw = [cs] if isinstance(cs, (int, float)) else list(cs)
    try:
        vals = sorted({float(c) for c in raw})
    except (TypeError, ValueError):
        raise ValueError(f"{option} needs positive numbers, got {raw}") from None
    if not vals or not all(np.isfinite(c) and c > 0 for c in vals):
        raise ValueError(f"{option} needs positive numbers, got {raw}")
    return tuple(vals)


def holdout_split(y: np.ndarray, seed: int, fraction: float = HOLDOUT) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, held)`` indices of ``y``: ``stratified_indices`` draws ``fraction`` (at most 0.5) of every
    class of 2 images or more, at least one each and never the whole class; a class of one image stays in
    the fit part, so that the probe still learns it."""
    from ..eval.lowshot import stratified_indices  # numpy only

    if not 0 < fraction <= 0.5:
        raise ValueError(f"held-out fraction {fraction} must be in (0, 0.5]")
    y = np.asarray(y)
    eligible = np.flatnonzero(np.bincount(y)[y] >= 2)
    if not len(eligible):
        raise HoldoutError("no class has 2 train images: nothing can be held out to choose C")
    held = eligible[stratified_indices(y[eligible], fraction, seed)]
    return np.setdiff1d(np.arange(len(y)), held), held


def choose_c(train_x: np.ndarray, train_y: np.ndarray, class_names: list[str], cs: Sequence[float], seed: int = 0,
             **kw) -> tuple[float, dict[float, float]]:
    """The C of ``cs`` whose probe, fitted on the rest of the train features, scores the best top-1 on a
    held-out stratified, seeded part of them (``holdout_split``), and every candidate's score. A tie goes
    to the smaller C, the stronger regularisation."""
    fit, held = holdout_split(train_y, seed)
    scores = {c: linear_probe(train_x[fit], train_y[fit], train_x[held], train_y[held], class_names, C=c, seed=seed,
                              **kw).metrics["top1"] for c in linear_cs(cs)}
    return max(scores, key=lambda c: (scores[c], -c)), scores


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                     class_names: list[str], cs: Union[float, Sequence[float]] = (1.0,), seed: int = 0,
                     **kw) -> ProbeResult:
    """``linear_probe`` with C from ``cs``: one C is used as it is (the fit ``linear_probe`` makes); among
    several, ``choose_c`` picks one on held-out train features, and the probe is refitted on all of them
    with it and scored on val. ``result.C`` is the C used, ``result.c_scores`` the candidates' held-out top-1."""
    cs = linear_cs(cs)
    if len(cs) == 1:
        return linear_probe(train_x, train_y, val_x, val_y, class_names, C=cs[0], seed=seed, **kw)
    best, scores = choose_c(train_x, train_y, class_names, cs, seed=seed, **kw)
    res = linear_probe(train_x, train_y, val_x, val_y, class_names, C=best, seed=seed, **kw)
    res.c_scores = scores
    return res


def per_class_report(y: np.ndarray, pred: np.ndarray, class_names: list[str]) -> str:
    """scikit-learn's per-class report with a row for every class, those without val images too. Its
    "macro avg" row averages every listed class, so on a val subset that lacks some classes it would
    disagree with the logged macro scores; then a last row gives the macro average over the classes
    present (``macro_scores``), the figures the run logs."""
    labels = np.arange(len(class_names))
    report = classification_report(y, pred, labels=labels, target_names=class_names, zero_division=0, digits=3)
    present = np.union1d(y, pred)
    if len(present) < len(labels):
        m = macro_scores(y, pred)
        report += (f"macro avg over the {len(present)} classes present (logged) {m['precision']:9.3f} "
                   f"{m['recall']:9.3f} {m['macro_f1']:9.3f} {len(y):9d}\n")
    return report
