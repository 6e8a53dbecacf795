"""Process start-up: what every Ray Train worker, Tune trial and CLI process pays once, before its
first batch. Two comparisons, each side by side in one run (the variants alternate, each in a fresh
process; the figure is the median of ``--runs`` processes per variant, timed inside the process):

``--what ffcv``: seconds spent importing ffcv (after torch, which every worker imports anyway), with
and without sslray's on-disk cache of ffcv's import-time numba compiles
(``sslray.datasets.compile_cache``). ``uncached`` gets an empty numba cache folder every time
(numba's default for these helpers: compile in memory), ``cached`` one folder that a first, untimed
process filled.

``--what bytecode``: seconds spent importing the training loop (``sslray.raytrain.loop``: torch,
timm, ffcv and sslray), from a copy of sslray with and without its bytecode caches
(``__pycache__``) and with ``PYTHONDONTWRITEBYTECODE=1``, as where the environment sets it and
nothing wrote them: then every process compiles sslray's sources again. ``make test`` and
``make demo`` let Python write them. Both share one warm numba cache.

    python benchmarks/startup.py --what ffcv --runs 7 --append
    python benchmarks/startup.py --what bytecode --runs 7 --append
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
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


LOOP = """
import json, time
t0 = time.perf_counter()
import sslray.raytrain.loop
print(json.dumps({"seconds": time.perf_counter() - t0, "file": sslray.raytrain.loop.__file__}))
"""


def timed(code: str, cache_dir: str, path: Path = C.REPO, **env) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir,
           "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")]), **env}
    # run in ``path``: ``python -c`` puts the working folder first on sys.path
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=path)
    return json.loads(out.stdout.strip().splitlines()[-1])


def one(cached: bool, cache_dir: str) -> float:
    return float(timed(PROBE.format(cached=cached), cache_dir)["seconds"])


def sslray_copy(dest: Path, compiled: bool) -> Path:
    """A copy of the sslray package under ``dest`` (found before the installed one on PYTHONPATH),
    without bytecode caches, or with every module compiled."""
    shutil.copytree(C.REPO / "sslray", dest / "sslray", ignore=shutil.ignore_patterns("__pycache__"))
    if compiled and not compileall.compile_dir(dest / "sslray", quiet=1):
        raise RuntimeError(f"could not compile {dest / 'sslray'}")
    return dest


def loop_import(copy: Path, cache_dir: str) -> float:
    got = timed(LOOP, cache_dir, copy, PYTHONDONTWRITEBYTECODE="1")
    if not Path(got["file"]).is_relative_to(copy):  # the timing must be of the copy, not the installed package
        raise RuntimeError(f"imported {got['file']}, not the copy under {copy}")
    return float(got["seconds"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=("ffcv", "bytecode"), default="ffcv", help="which comparison (see above)")
    p.add_argument("--runs", type=int, default=7, help="fresh processes per variant")
    p.add_argument("--append", action="store_true", help="add the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sslray-startup-") as tmp:
        warm = str(Path(tmp) / "warm")
        one(True, warm)  # fills the numba cache; not timed
        if args.what == "ffcv":
            names, what = ("uncached", "cached"), "`import ffcv`"
            title = "Process start-up: ffcv import with and without the compile cache"
            run = {"uncached": lambda i: one(False, str(Path(tmp) / f"cold{i}")), "cached": lambda i: one(True, warm)}
        else:
            names, what = ("no bytecode", "bytecode"), "`import sslray.raytrain.loop`"
            title = "Process start-up: the training loop's import with and without sslray's bytecode caches"
            copies = {k: sslray_copy(Path(tmp) / k.replace(" ", "_"), k == "bytecode") for k in names}
            run = {k: (lambda i, c=copies[k]: loop_import(c, warm)) for k in names}
        times: dict[str, list[float]] = {k: [] for k in names}
        for i in range(args.runs):
            for k in names:
                times[k].append(run[k](i))
    med = {k: C.median(v) for k, v in times.items()}
    lines = [f"| variant | {what} in a fresh process, s (median) | all runs, s |", "| --- | --- | --- |"]
    for k, v in times.items():
        lines.append(f"| {k} | {med[k]:.2f} | {', '.join(f'{x:.2f}' for x in v)} |")
    slow, fast = names
    lines.append(f"\nratio {slow} / {fast}: {med[slow] / med[fast]:.2f}x "
                 f"({med[slow] - med[fast]:.2f} s saved per process)")
    for line in lines:
        print(line, flush=True)
    if args.append:
        C.append_table("startup.py", argv, title, args.runs, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
