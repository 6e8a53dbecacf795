"""Stratified, seeded label subsets for low-shot probes (1%, 10%, 100% of the labels per class)."""

from __future__ import annotations

import numpy as np


def per_class_count(n: int, fraction: float) -> int:
    """Images kept from a class of ``n``: ``round(fraction * n)``, at least 1, at most ``n``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"low-shot fraction {fraction} must be in (0, 1]")
    return n if fraction >= 1 else min(n, max(1, int(round(fraction * n))))


def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices holding ``per_class_count`` images of every class, drawn without replacement.

    The same (labels, fraction, seed) always gives the same indices; each class draws from its own
    stream ``default_rng([seed, class])``, so adding a class never changes another class's draw.
    """
    labels = np.asarray(labels)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = per_class_count(len(idx), fraction)
        out.append(idx if k == len(idx) else np.random.default_rng([seed, int(c)]).choice(idx, k, replace=False))
    return np.sort(np.concatenate(out))


def fraction_label(fraction: float) -> str:
    """``0.01`` -> ``1pct``, ``0.1`` -> ``10pct``, ``1.0`` -> ``100pct`` (MLflow metric keys)."""
    pct = 100 * fraction
    return f"{pct:g}pct".replace(".", "_")
