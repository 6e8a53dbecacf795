"""View throughput alone: views/s of each view backend (fused, kornia) on uint8 batches already on
the device, for the SimCLR two-view preset at 32 px (batch 512) and 256 -> 224 px (batch 256, with
blur), the settings of ../shared/ANCHORS.md's "per-sample GPU views alone" row.

Side by side in one run; each figure is the median of ``--runs`` timings of ``--iters`` calls
(CUDA events on a GPU, perf_counter on the CPU), after warm-up. Random uint8 inputs, 4 buffers
rotating. ``--append`` adds the table to benchmarks/RESULTS.md.

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


def time_views(backend: str, src: int, size: int, batch: int, blur: bool, device, iters: int, runs: int):
    from sslray.datasets.views import BACKENDS, _base

    p = _base(size, 0.08, 1.0, blur, size <= 64)
    aug = BACKENDS.get(backend)(p).to(device)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 256, (batch, 3, src, src), dtype=torch.uint8, generator=g).to(device) for _ in range(4)]
    for i in range(3):
        aug(xs[i % 4])
    C.sync(device)
    rates = []
    for _ in range(runs):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for i in range(iters):
                for v in range(2):
                    aug(xs[(2 * i + v) % 4])
            b.record()
            b.synchronize()
            dt = a.elapsed_time(b) / 1000
        else:
            t0 = time.perf_counter()
            for i in range(iters):
                for v in range(2):
                    aug(xs[(2 * i + v) % 4])
            dt = time.perf_counter() - t0
        rates.append(2 * batch * iters / dt)
    return rates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU check: batch 16, 2 iterations")
    ap.add_argument("--iters", type=int, default=20, help="two-view calls per timing")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--backends", default="fused,kornia")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args(argv)
    device = C.device_of(args.device)
    iters = 2 if args.tiny else args.iters
    backends = [b for b in args.backends.split(",") if b != "kornia" or C.importable("kornia")]
    lines = ["| views | backend | views/s (median) | runs | vs kornia |", "| --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for name, src, size, batch, blur in SETTINGS:
        if args.tiny:
            name, batch = name.split(",")[0] + ", batch 16 [tiny]", 16
        res = {b: time_views(b, src, size, batch, blur, device, iters, args.runs) for b in backends}
        ref = C.median(res["kornia"]) if "kornia" in res else float("nan")
        for b, r in res.items():
            line = (f"| {name} | {b} | {C.median(r):,.0f} | {', '.join(f'{v:,.0f}' for v in r)} | "
                    f"{C.median(r) / ref:.2f}x |")
            lines.append(line)
            print(line, flush=True)
    if args.append:
        title = "Views alone: fused vs kornia backend, two SimCLR views per image"
        C.append_table("views.py", argv, title + (" (CPU)" if args.tiny or device.type == "cpu" else ""), args.runs, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
