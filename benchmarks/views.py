"""View throughput alone: views/s of each view backend on uint8 batches already on the device, for
the SimCLR two-view preset at 32 px (batch 512) and 256 -> 224 px (batch 256, with blur), the
settings of ../shared/ANCHORS.md's "per-sample GPU views alone" row, through ``MultiView`` as the
training step calls it.

Variants: ``fused`` (default: both views of an image in one call, ``MultiView`` grouping),
``fused-per-view`` (the same module called once per view) and ``kornia``. Besides views/s, each
row counts the compute ops one two-view call dispatches (aten ops that are not views or
reshapes; on a GPU nearly each is a kernel launch): the host-side cost per step, which bounds a
small-batch step. Side by side in one run; each figure is the median of ``--runs`` timings of
``--iters`` calls (CUDA events on a GPU, perf_counter on the CPU), after warm-up. Random uint8
inputs, 4 buffers rotating. ``--append`` adds the table to benchmarks/RESULTS.md.

    python benchmarks/views.py --append             # GPU
    python benchmarks/views.py --tiny               # CPU check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

import torch  # noqa: E402

SETTINGS = [("32 px, batch 512", 32, 32, 512, False), ("256 -> 224 px, batch 256, blur", 256, 224, 256, True)]


# aten ops that only make views or metadata (no kernel), left out of the op count
_NO_KERNEL = {"view", "expand", "unsqueeze", "squeeze", "detach", "alias", "slice", "select", "permute", "t",
              "transpose", "_unsafe_view", "as_strided", "split", "split_with_sizes", "unbind", "empty",
              "empty_like", "empty_strided", "lift_fresh", "_reshape_alias", "reshape"}


def count_ops(fn) -> int:
    """Compute ops (not views/metadata) that ``fn()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket.__name__ not in _NO_KERNEL
            return func(*args, **(kwargs or {}))

    with Count() as c:
        fn()
    return c.n


VARIANTS = {"fused": ("fused", True), "fused-per-view": ("fused", False), "kornia": ("kornia", True)}


def time_views(variant: str, src: int, size: int, batch: int, blur: bool, device, iters: int, runs: int):
    """(views/s of each run, compute ops per two-view call) for one variant."""
    from sslray.datasets.views import MultiView, simclr_views

    backend, group = VARIANTS[variant]
    mv = MultiView(simclr_views(size=size, min_scale=0.08, jitter_strength=1.0, blur=blur), backend, group).to(device)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 256, (batch, 3, src, src), dtype=torch.uint8, generator=g).to(device) for _ in range(4)]
    for i in range(3):
        mv(xs[i % 4])
    ops = count_ops(lambda: mv(xs[0]))
    C.sync(device)
    rates = []
    for _ in range(runs):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for i in range(iters):
                mv(xs[i % 4])
            b.record()
            b.synchronize()
            dt = a.elapsed_time(b) / 1000
        else:
            t0 = time.perf_counter()
            for i in range(iters):
                mv(xs[i % 4])
            dt = time.perf_counter() - t0
        rates.append(2 * batch * iters / dt)
    return rates, ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU check: batch 16, 2 iterations")
    ap.add_argument("--iters", type=int, default=20, help="two-view calls per timing")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--backends", default=",".join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args(argv)
    device = C.device_of(args.device)
    iters = 2 if args.tiny else args.iters
    backends = [b for b in args.backends.split(",") if b != "kornia" or C.importable("kornia")]
    bad = [b for b in backends if b not in VARIANTS]
    if bad:
        ap.error(f"unknown --backends {bad}; known: {', '.join(VARIANTS)}")
    lines = ["| views | backend | views/s (median) | runs | compute ops per 2-view call | vs kornia |",
             "| --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for name, src, size, batch, blur in SETTINGS:
        if args.tiny:
            name, batch = name.split(",")[0] + ", batch 16 [tiny]", 16
        res = {b: time_views(b, src, size, batch, blur, device, iters, args.runs) for b in backends}
        ref = C.median(res["kornia"][0]) if "kornia" in res else float("nan")
        for b, (r, ops) in res.items():
            line = (f"| {name} | {b} | {C.median(r):,.0f} | {', '.join(f'{v:,.0f}' for v in r)} | {ops} | "
                    f"{C.median(r) / ref:.2f}x |")
            lines.append(line)
            print(line, flush=True)
    if args.append:
        title = "Views alone: fused (grouped, per view) vs kornia backend, two SimCLR views per image"
        C.append_table("views.py", argv, title + (" (CPU)" if args.tiny or device.type == "cpu" else ""), args.runs, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
