"""Process start-up of the data stack: seconds a fresh Python process spends importing ffcv (after
torch, which every worker imports anyway), with and without sslray's on-disk cache of ffcv's
import-time numba compiles (``sslray.datasets.compile_cache``).

Every Ray Train worker, Tune trial and CLI process pays this once, before its first batch. Side by
side in one run: the two variants alternate, each in a fresh process; ``uncached`` gets an empty
numba cache folder every time (numba's default for these helpers: compile in memory), ``cached``
one folder that a first, untimed process filled. The figure is the median of ``--runs`` processes
per variant, timed inside the process from just before ``import ffcv`` to just after it.

    python benchmarks/startup.py --runs 7 --append
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

PROBE = """
import json, time
import torch
t0 = time.perf_counter()
if {cached}:
    import sslray.datasets  # switches the cache on (what every sslray process that reads data pays)
import ffcv
print(json.dumps({{"seconds": time.perf_counter() - t0}}))
"""


def one(cached: bool, cache_dir: str) -> float:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "PYTHONPATH": os.pathsep.join([str(C.REPO),
                                                                                    os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", PROBE.format(cached=cached)], env=env, capture_output=True, text=True,
                         check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=7, help="fresh processes per variant")
    p.add_argument("--append", action="store_true", help="add the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    with tempfile.TemporaryDirectory(prefix="sslray-startup-") as tmp:
        warm = str(Path(tmp) / "warm")
        one(True, warm)  # fills the cache; not timed
        for i in range(args.runs):
            times["uncached"].append(one(False, str(Path(tmp) / f"cold{i}")))
            times["cached"].append(one(True, warm))
    med = {k: C.median(v) for k, v in times.items()}
    lines = ["| variant | `import ffcv` in a fresh process, s (median) | all runs, s |", "| --- | --- | --- |"]
    for k, v in times.items():
        lines.append(f"| {k} | {med[k]:.2f} | {', '.join(f'{x:.2f}' for x in v)} |")
    lines.append(f"\nratio uncached / cached: {med['uncached'] / med['cached']:.1f}x "
                 f"({med['uncached'] - med['cached']:.1f} s saved per process)")
    for line in lines:
        print(line, flush=True)
    if args.append:
        title = "Process start-up: ffcv import with and without the compile cache"
        C.append_table("startup.py", argv, title, args.runs, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
