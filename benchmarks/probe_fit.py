"""The linear probe's fit (``sslray.raytrain.probe.linear_probe``) with its BLAS thread rule (one
thread under ``ONE_THREAD_BELOW`` feature values) against the library's default threads, side by side
in one run: the variants alternate for every size, each fit timed whole (scaler + L-BFGS to
convergence, up to ``--max-iter``), the figure the median of ``--runs`` fits.

The features are 10 Gaussian classes (means 1 apart, unit noise) at ``--dim`` dims, a stand-in for
frozen backbone features: the iteration count depends on the data, the per-iteration cost (what the
thread rule changes) on the size only. Sizes are CIFAR-10 probe sizes: a test subset, the lowshot
1%/10% fits and the full 50,000-image train split.

    python benchmarks/probe_fit.py --runs 5 --append
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from sslray.raytrain.probe import ONE_THREAD_BELOW, blas_threads, linear_probe  # noqa: E402


def features(n: int, dim: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)).astype(np.float32) / np.sqrt(dim) * 4
    y = np.arange(n) % classes
    return (means[y] + rng.normal(size=(n, dim)).astype(np.float32)), y


def fit_seconds(x, y, vx, vy, threads, max_iter: int) -> float:
    t0 = time.perf_counter()
    linear_probe(x, y, vx, vy, [str(c) for c in range(10)], max_iter=max_iter, threads=threads)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="128,500,5000,20000,50000", help="training images per fit")
    p.add_argument("--dim", type=int, default=512, help="feature dims (ResNet-18: 512, ResNet-50: 2048)")
    p.add_argument("--runs", type=int, default=5, help="fits per variant and size")
    p.add_argument("--max-iter", type=int, default=3000, help="the probe's own default")
    p.add_argument("--append", action="store_true", help="add the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    vx, vy = features(1000, args.dim, seed=1)
    lines = ["| train images x dims | threads by the rule | rule, s (median) | library default, s (median) "
             "| default / rule |", "| --- | --- | --- | --- | --- |"]
    for n in (int(s) for s in args.sizes.split(",")):
        x, y = features(n, args.dim)
        fit_seconds(x, y, vx, vy, "auto", args.max_iter)  # first fit pays scikit-learn's lazy imports
        times = {"auto": [], None: []}
        for _ in range(args.runs):
            for threads in times:
                times[threads].append(fit_seconds(x, y, vx, vy, threads, args.max_iter))
        rule, default = C.median(times["auto"]), C.median(times[None])
        lines.append(f"| {n:,} x {args.dim} | {blas_threads(x.size) or 'default'} | {rule:.3f} | {default:.3f} "
                     f"| {default / rule:.2f}x |")
        print(lines[-1], flush=True)
    if args.append:
        C.append_table("probe_fit.py", argv, "Linear probe fit: one BLAS thread for small fits vs the default",
                       args.runs, lines, note=f"- rule: one thread below {ONE_THREAD_BELOW:,} feature values\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
