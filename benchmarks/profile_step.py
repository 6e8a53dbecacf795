"""Where a training step's time goes: torch.profiler over steps of sslray's real ``train_loop``
(one throughput.py row, resident real data), after one warm-up epoch.

The profiler runs only while steps run: a wrapper around the loader starts it when step
``--skip`` + 1 is fetched and stops it when the loop fetches past its last step, with the device
synchronised at both ends; model construction, the epoch-end monitors (the collapse SVD) and the
kNN are outside the window. Reported per step (the profiler's own overhead is in
the profiled wall, not in the unprofiled one):

  * kernel time per step (the sum of every kernel's device time / steps),
  * wall per step unprofiled (a separate epoch of the same steps, no profiler),
  * device-bound fraction = kernel time / unprofiled wall: near 1 means the GPU is the limit, well
    under 1 means host-side work (Python, launches, syncs) is;
  * kernel launches per step (``cudaLaunchKernel*`` calls; on the CPU: aten ops per step), the
    host-side cost a CUDA graph would remove.

Then a table per part of the step (the loop's ``sslray.*`` profiler ranges: views, forward,
backward, health, optimizer, on_step, online_probe): ops dispatched from Python, kernel launches,
host time and device time per step. Then the top ops by device time (self) and by host time.
``--out`` writes the full tables (and with ``--trace`` a Chrome trace) there.

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


class ProfiledLoader:
    """Iterates ``inner``; profiles from the fetch of batch ``skip`` to the fetch after batch ``stop - 1``
    (the loop fetches one batch past its last step before it breaks), timing that window."""

    def __init__(self, inner, prof, device, skip: int, stop: int):
        self.inner, self.prof, self.device, self.skip, self.stop = inner, prof, device, skip, stop
        self.wall = 0.0
        self.steps = 0

    def __len__(self):
        return len(self.inner)

    @property
    def next_epoch(self):
        return self.inner.next_epoch

    @next_epoch.setter
    def next_epoch(self, value):
        self.inner.next_epoch = value

    def __iter__(self):
        t0 = None
        for i, batch in enumerate(self.inner):
            if i == self.skip:
                C.sync(self.device)
                self.prof.start()
                t0 = time.perf_counter()
            if i == self.stop and t0 is not None:
                C.sync(self.device)
                self.wall = time.perf_counter() - t0
                self.prof.stop()
                self.steps = i - self.skip
                t0 = None
            yield batch
        if t0 is not None:  # the loader ran out before ``stop``
            C.sync(self.device)
            self.wall = time.perf_counter() - t0
            self.prof.stop()
            self.steps = len(self.inner) - self.skip


def per_step(ka, steps: int, device) -> dict:
    """Kernel time, launches and host op counts per step from the profiler's key averages."""
    events = list(ka)
    if device.type == "cuda":
        kernel = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events if e.device_type.name == "CUDA")
        launches = sum(e.count for e in events if e.key.startswith("cudaLaunchKernel"))
    else:
        kernel, launches = float("nan"), 0
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    return {"kernel_ms": kernel / 1e3 / steps, "launches": launches / steps, "aten_ops": ops / steps}


def top_level_ops(events, steps: int) -> float:
    """aten ops per step with no aten op above them: what Python code (and autograd) dispatched."""
    n = sum(1 for e in events if e.name.startswith("aten::")
            and not any(p.name.startswith("aten::") for p in _parents(e)))
    return n / steps


def by_region(events, steps: int) -> list[tuple[str, float, float, float, float]]:
    """``(region, top-level aten ops, kernel launches, host ms, device ms)`` per step for each
    ``sslray.*`` range; top-level = aten ops with no aten op above them inside the range (what the
    Python code dispatched)."""
    acc: dict[str, list[float]] = {}

    def count(e, inside_aten: bool, row: list[float]) -> None:
        """Counts ``e`` (when it is a top-level aten op or a launch) and everything below it."""
        is_aten = e.name.startswith("aten::")
        row[0] += is_aten and not inside_aten
        row[1] += e.name.startswith("cudaLaunchKernel")
        for c in e.cpu_children:
            count(c, inside_aten or is_aten, row)

    for e in events:
        if e.name.startswith("sslray."):
            if any(p.name.startswith("sslray.") for p in _parents(e)):
                continue
            name = e.name
        elif e.cpu_parent is None and not e.name.startswith("ProfilerStep"):
            # outside every part: loop code, and on a GPU the backward ops, which autograd runs on its
            # own device thread (so they sit under no range of the main thread)
            name = "(outside the parts)"
        else:
            continue
        row = acc.setdefault(name, [0.0, 0.0, 0.0, 0.0])
        count(e, False, row)
        row[2] += e.cpu_time_total / 1e3
        row[3] += (getattr(e, "device_time_total", 0) or 0) / 1e3
    return [(k, *(v / steps for v in row)) for k, row in acc.items()]


def _parents(e):
    p = e.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--row", type=int, default=1, help="throughput.py row number (1-based)")
    ap.add_argument("--steps", type=int, default=20, help="profiled steps")
    ap.add_argument("--skip", type=int, default=3, help="steps of the profiled epoch run before profiling starts")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--out", default="")
    ap.add_argument("--trace", action="store_true", help="also write a Chrome trace (.json.gz) under --out")
    ap.add_argument("--cache-dir", default=C.DEFAULT_CACHE)
    args = ap.parse_args(argv)
    device = C.device_of("auto")
    row = T.ROWS[args.row - 1]
    batch, res = (8, 32) if args.tiny else (row.batch, row.res)
    steps, skip = (2, 1) if args.tiny else (args.steps, args.skip)
    total = skip + steps
    cfg = T.row_config(row, batch, res, total, 1, args.set, args.tiny).replace(**{"train.epochs": 1})
    ds, _ = T.real_dataset(res, args.tiny, args.cache_dir, device)
    from sslray.datasets.resident import ResidentLoader
    from sslray.raytrain.data import Data

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts)
    wrapped: list[ProfiledLoader] = []

    def resident(cfg, session, profiled: bool = False):
        tr = ResidentLoader(ds, cfg.data.batch_size, train=True, seed=cfg.train.seed)
        if profiled:
            tr = ProfiledLoader(tr, prof, device, skip, total)
            wrapped.append(tr)
        return Data(tr, None, None, len(ds.classes), min(len(tr), total))

    C.run_loop(cfg, device, resident)  # warm-up (cudnn autotune, allocator)
    _, hist, _ = C.run_loop(cfg, device, resident)  # unprofiled: the loop's own img/s over all its steps
    unprofiled_ms = 1e3 * batch / hist[-1]["images_per_sec"]
    C.run_loop(cfg, device, lambda c, s: resident(c, s, profiled=True))
    w = wrapped[-1]
    if not w.steps:
        raise SystemExit(f"profile_step: no step was profiled (the epoch had fewer than {skip + 1} steps)")
    ka = prof.key_averages()
    s = per_step(ka, w.steps, device)
    dev_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    by_dev = ka.table(sort_by=dev_key, row_limit=25)
    by_cpu = ka.table(sort_by="self_cpu_time_total", row_limit=25)
    summary = (f"{row.name}, batch {batch}, {res} px: {hist[-1]['images_per_sec']:,.0f} img/s in the loop "
               f"unprofiled ({unprofiled_ms:.2f} ms/step); {w.steps} profiled steps: wall {1e3 * w.wall / w.steps:.2f} "
               f"ms/step under the profiler, {top_level_ops(prof.events(), w.steps):.0f} top-level aten ops/step "
               f"({s['aten_ops']:.0f} with nested ones)")
    if device.type == "cuda":
        summary += (f", kernel time {s['kernel_ms']:.2f} ms/step, {s['launches']:.0f} kernel launches/step; "
                    f"device-bound fraction (kernel / unprofiled wall) {s['kernel_ms'] / unprofiled_ms:.0%}")
    parts = ["| part of the step | ops dispatched | kernel launches | host ms | device ms |",
             "| --- | --- | --- | --- | --- |"]
    for name, ops, launches, host, dev in by_region(prof.events(), w.steps):
        parts.append(f"| {name} | {ops:.0f} | {launches:.0f} | {host:.2f} | {dev:.2f} |")
    parts = "\n".join(parts)
    print(by_dev[-6000:] if device.type == "cuda" else by_cpu[-6000:])
    print(parts)
    print(summary)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"profile_row{args.row}.txt").write_text("\n\n".join(
            [summary, "per step, by part\n" + parts, "by device time\n" + by_dev, "by host time\n" + by_cpu]))
        if args.trace:
            prof.export_chrome_trace(str(out / f"trace_row{args.row}.json.gz"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
