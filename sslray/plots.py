"""Every picture sslray logs is drawn here (matplotlib, Agg): curves, confusion matrices."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curves(series: Mapping[str, Sequence[tuple[float, float]]], title: str = "", xlabel: str = "epoch",
           baselines: Mapping[str, float] | None = None):
    """One panel per metric; ``baselines`` draws a dashed reference (e.g. random-init kNN)."""
    keys = [k for k, v in series.items() if len(v)]
    n = max(1, len(keys))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        xs, ys = zip(*series[k])
        ax.plot(xs, ys, marker="o", ms=3)
        if baselines and k in baselines:
            ax.axhline(baselines[k], ls="--", c="grey", label="random init")
            ax.legend(fontsize=8)
        ax.set_title(k)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion(cm: np.ndarray, classes: Sequence[str], title: str = "confusion matrix"):
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    if len(classes) <= 20:
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def metric_vs_params(rows: Sequence[Mapping], keys: Sequence[str], metric: str, log_x: Sequence[str] = (),
                     title: str = ""):
    """One panel per hyperparameter: each trial's final ``metric`` against its sampled value.
    Completed trials are dots, early-stopped ones triangles, failed ones red crosses on the floor."""
    keys = list(keys) or ["(none)"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    vals = [r[metric] for r in rows if isinstance(r.get(metric), float)]
    floor = min(vals) if vals else 0.0
    styles = {"completed": ("o", "C0"), "stopped_early": ("^", "C1"), "failed": ("x", "red")}
    for ax, k in zip(axes[0], keys):
        for status, (marker, colour) in styles.items():
            pts = [(r["config"].get(k), r.get(metric, floor) if status != "failed" else floor)
                   for r in rows if r["status"] == status and isinstance(r["config"].get(k), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, marker=marker, c=colour, s=36, label=status.replace("_", " "))
        if k in log_x:
            ax.set_xscale("log")
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
