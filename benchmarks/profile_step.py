"""Where a training step's time goes: torch.profiler over ``--steps`` steps of sslray's real
``train_loop`` (one throughput.py row, resident real data), after one warm-up epoch.

Prints the top ops by device time (self) and by host time, and the device-busy fraction: the sum of
kernel time over the wall time of the profiled epoch. A busy fraction well under 1 means the step
is bound by the host (Python, launches, syncs), not by the GPU. ``--out`` writes the full tables
(and with ``--trace`` a Chrome trace) there.

    python benchmarks/profile_step.py --row 1 --out prof/
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import throughput as T  # noqa: E402

from torch.profiler import ProfilerActivity, profile  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--row", type=int, default=1, help="throughput.py row number (1-based)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--out", default="")
    ap.add_argument("--trace", action="store_true", help="also write a Chrome trace (.json.gz) under --out")
    ap.add_argument("--cache-dir", default=C.DEFAULT_CACHE)
    args = ap.parse_args(argv)
    device = C.device_of("auto")
    row = T.ROWS[args.row - 1]
    batch, res = (8, 32) if args.tiny else (row.batch, row.res)
    steps = 2 if args.tiny else args.steps
    cfg = T.row_config(row, batch, res, steps, 1, args.set, args.tiny)
    ds, _ = T.real_dataset(res, args.tiny, args.cache_dir, device)
    from sslray.datasets.resident import ResidentLoader
    from sslray.raytrain.loop import Data

    def resident(cfg, session):
        tr = ResidentLoader(ds, cfg.data.batch_size, train=True, seed=cfg.train.seed)
        return Data(tr, None, None, len(ds.classes), min(len(tr), steps))

    C.run_loop(cfg.replace(**{"train.epochs": 1}), device, resident)  # warm-up (cudnn autotune, allocator)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    cfg1 = cfg.replace(**{"train.epochs": 1})
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        _, hist, _ = C.run_loop(cfg1, device, resident)
        C.sync(device)
    wall = time.perf_counter() - t0
    ka = prof.key_averages()
    dev_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busy = sum(getattr(e, "self_device_time_total", 0) or 0 for e in ka) / 1e6 if device.type == "cuda" else float("nan")
    by_dev = ka.table(sort_by=dev_key, row_limit=25)
    by_cpu = ka.table(sort_by="self_cpu_time_total", row_limit=25)
    summary = (f"{row.name}, batch {batch}, {res} px, {steps} steps: {hist[-1]['images_per_sec']:,.0f} img/s in the "
               f"loop; profiled wall {wall:.2f} s, device busy {busy:.2f} s ({busy / wall:.0%})")
    print(by_dev[-6000:] if device.type == "cuda" else by_cpu[-6000:])
    print(summary)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"profile_row{args.row}.txt").write_text(summary + "\n\nby device time\n" + by_dev + "\n\nby host time\n" + by_cpu)
        if args.trace:
            prof.export_chrome_trace(str(out / f"trace_row{args.row}.json.gz"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
