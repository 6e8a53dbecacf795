"""Every picture sslray logs is drawn here (matplotlib, Agg): curves, confusion matrices, image grids
(augmented views, MAE reconstructions, kNN retrieval) and schedules."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curves(series: Mapping[str, Sequence[tuple[float, float]]], title: str = "", xlabel: str = "epoch",
           baselines: Mapping[str, float] | None = None, marker: str | None = "o", height: float = 3.2):
    """One panel per metric, each a list of ``(x, y)``; ``baselines`` draws a dashed reference (e.g.
    random-init kNN)."""
    keys = [k for k, v in series.items() if len(v)]
    n = max(1, len(keys))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, height), squeeze=False)
    for ax, k in zip(axes[0], keys):
        xs, ys = zip(*series[k])
        ax.plot(xs, ys, marker=marker, ms=3, lw=1.5)
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

    def value(r):
        v = r.get(metric)
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

    vals = [v for v in map(value, rows) if v is not None]
    floor = min(vals) if vals else 0.0  # where trials without a finite metric (failed ones, NaN) are drawn
    styles = {"completed": ("o", "C0"), "stopped_early": ("^", "C1"), "failed": ("x", "red")}
    for ax, k in zip(axes[0], keys):
        for status, (marker, colour) in styles.items():
            pts = [(r["config"].get(k), floor if status == "failed" or value(r) is None else value(r))
                   for r in rows if r["status"] == status and isinstance(r["config"].get(k), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, marker=marker, c=colour, s=36, label=status.replace("_", " "))
        if k in log_x:
            ax.set_xscale("log")
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:  # categorical keys (a study's method/policy) plot no points
        axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)


def _integer_ticks(axis) -> None:
    """Whole-number ticks only (epochs). ``min_n_ticks=1``: by default MaxNLocator gives up on integers
    when fewer than two lie in view, so a one-epoch run got ticks 0.945 ... 1.05."""
    axis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))


def overlay(series: Mapping[str, Sequence[tuple[float, float]]], title: str, ylabel: str, xlabel: str = "epoch"):
    """Several runs on one axes, one line per label (e.g. the loss of each method against epoch)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, pts in series.items():
        if len(pts):
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=4, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _integer_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    if any(len(pts) for pts in series.values()):
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def panels(series: Mapping[str, Sequence[tuple[float, float]]], title: str, ylabel: str, xlabel: str = "epoch",
           cols: int = 4):
    """One small panel per label, each with its own y scale (losses of different methods differ by
    orders of magnitude: Barlow Twins' is in the thousands, SimCLR's near log(2N))."""
    keys = list(series)
    n = max(1, len(keys))
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for i, ax in enumerate(axes.flat):
        if i >= len(keys):
            ax.axis("off")
            continue
        pts = series[keys[i]]
        if len(pts):
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=4, color=cmap(i % 10))
        ax.set_title(keys[i], fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        _integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def bars_by_group(labels: Sequence[str], groups: Sequence[str], values: Mapping[str, Sequence[float]],
                  title: str = ""):
    """One panel per metric in ``values``; bars ordered and coloured by group (e.g. SSL family),
    a dashed divider between groups and the value printed on each bar. NaN bars are left out."""
    order = sorted(range(len(labels)), key=lambda i: (groups[i], labels[i]))
    names = sorted(set(groups))
    cmap = plt.get_cmap("tab10")
    colour = {g: cmap(i % 10) for i, g in enumerate(names)}
    n = max(1, len(values))
    fig, axes = plt.subplots(1, n, figsize=(max(4.0, 0.55 * len(labels) + 1.8) * n, 4.2), squeeze=False)
    for ax, (metric, vals) in zip(axes[0], values.items()):
        ys = [float(vals[i]) for i in order]
        xs = np.arange(len(order))
        ok = [i for i, y in enumerate(ys) if np.isfinite(y)]
        bars = ax.bar(xs[ok], [ys[i] for i in ok], color=[colour[groups[order[i]]] for i in ok])
        for b in bars:
            ax.annotate(f"{b.get_height():.3f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        for k in range(1, len(order)):  # group boundaries
            if groups[order[k]] != groups[order[k - 1]]:
                ax.axvline(k - 0.5, ls="--", c="grey", lw=0.8)
        ax.set_xticks(xs, [labels[i] for i in order], rotation=45, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[g]) for g in names]
    fig.legend(handles, names, loc="upper right", fontsize=8, title="family")
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    return fig


def embedding(coords: Mapping[str, np.ndarray], labels: Sequence[int], classes: Sequence[str], title: str = ""):
    """One scatter panel per entry of ``coords`` (``(N, 2)`` points, e.g. a t-SNE of pretrained and of
    random-init features), every point coloured by its class, one shared legend."""
    labels = np.asarray(labels)
    n = max(1, len(coords))
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.4), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax, (name, xy) in zip(axes[0], coords.items()):
        xy = np.asarray(xy)
        for c in range(len(classes)):
            m = labels == c
            if m.any():
                ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.8, color=cmap(c % cmap.N), label=classes[c])
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0][0].get_legend_handles_labels()
    if len(classes) <= 20:
        fig.legend(handles, names, loc="center right", fontsize=7, markerscale=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.86 if len(classes) <= 20 else 1, 1))
    return fig


# --- pictures of a run: views, reconstructions, retrieval, schedules -----------------------------


def to_images(x, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> list[np.ndarray]:
    """A batch ``(N, 3, H, W)`` (uint8, or float normalised with ``mean``/``std``, or float in [0, 1])
    -> a list of ``(H, W, 3)`` uint8 arrays for ``imshow``."""
    import torch

    t = torch.as_tensor(x).detach().cpu()
    if t.dtype != torch.uint8:
        t = t.float()
        if mean is not None and std is not None:
            t = t * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        t = (t.clamp(0, 1) * 255).round().to(torch.uint8)
    return [a for a in t.permute(0, 2, 3, 1).numpy()]


def image_grid(rows: Sequence[Sequence[np.ndarray]], col_titles: Sequence[str] = (), row_titles: Sequence[str] = (),
               title: str = "", cell: float = 1.3):
    """Rows of ``(H, W, 3)`` uint8 images (cells may differ in size, e.g. multi-crop views); a title
    over each column and at the left of each row."""
    n_rows = max(1, len(rows))
    n_cols = max(1, max((len(r) for r in rows), default=1))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols + 0.6, cell * n_rows + 0.5), squeeze=False)
    for r, ax_row in enumerate(axes):
        for c, ax in enumerate(ax_row):
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if r < len(rows) and c < len(rows[r]):
                ax.imshow(rows[r][c], interpolation="nearest")
            if r == 0 and c < len(col_titles):
                ax.set_title(col_titles[c], fontsize=8)
            if c == 0 and r < len(row_titles):
                ax.set_ylabel(row_titles[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def schedules(series: Mapping[str, Sequence[float]], title: str = "", xlabel: str = "step",
              xs: Sequence[float] | None = None):
    """One panel per schedule (lr, weight decay, EMA momentum), each value against the global step
    (``xs``; 0, 1, 2, ... when not given)."""
    pts = {}
    for k, v in series.items():
        ys = np.asarray(v, dtype=float)
        pts[k] = list(zip(np.arange(len(ys)) if xs is None else np.asarray(xs), ys))
    return curves(pts, title=title, xlabel=xlabel, marker=None, height=3.0)


def png_bytes(fig, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (closed afterwards): what workers hand to the driver."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def heatmaps(panels: Mapping[str, np.ndarray], rows: Sequence[str], cols: Sequence[str], title: str = "",
             fmt: Mapping[str, str] | None = None):
    """One annotated heatmap per entry of ``panels`` (a ``len(rows) x len(cols)`` matrix each, NaN for a
    missing cell), e.g. a study's method x view-policy matrices of linear and kNN top-1."""
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(1.1 * len(cols) * n + 2.2 * n, 0.55 * len(rows) + 1.9), squeeze=False)
    for ax, (name, m) in zip(axes[0], panels.items()):
        m = np.asarray(m, dtype=float)
        finite = m[np.isfinite(m)]
        im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", aspect="auto",
                       vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        spec = (fmt or {}).get(name, "{:.3g}")
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, spec.format(m[i, j]) if np.isfinite(m[i, j]) else "n/a", ha="center", va="center",
                        fontsize=8, color="grey" if not np.isfinite(m[i, j]) else "white" if m[i, j] < mid else "black")
        ax.set_title(name, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
