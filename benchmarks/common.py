"""Shared pieces of the GPU benchmarks: run sslray's own per-worker loop (``train_loop``) on a chosen
data source without Ray, and describe the machine a figure came from.

Honesty rule: every timed step is ``sslray.raytrain.loop.train_loop``'s step, unchanged. Only the
data source is swapped, by standing in for ``loop.build_data`` (until ``data.resident`` is wired into
``build_data`` itself): a GPU-resident dataset, synthetic uint8 batches already on the device, or the
real ``build_data`` (FFCV) when ffcv is importable. Ray, FFCV and MLflow are never imported here.
"""

from __future__ import annotations

import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The shared archives; SSLRAY_DATA_DIR points elsewhere (a machine without ../shared).
DATA_DIR = Path(os.environ.get("SSLRAY_DATA_DIR") or REPO.parent / "shared" / "data")
CIFAR_ARCHIVE = DATA_DIR / "cifar10-jpeg.tar.gz"
IMAGENETTE_ARCHIVE = DATA_DIR / "imagenette2-224.tar.gz"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
DEFAULT_CACHE = os.environ.get("SSLRAY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sslray"))


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def device_of(arg: str = "auto") -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class SyntheticLoader:
    """make_loader's interface over random uint8 batches already on the device (never zeros: they
    can time faster than real data). ``k`` buffers rotate so no step re-reads the last one's input."""

    def __init__(self, batch: int, res: int, steps: int, device: torch.device, k: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = [torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, generator=g).to(device)
                  for _ in range(k)]
        self.y = torch.randint(0, 10, (batch,), generator=g).to(device)
        self.steps = steps
        self.next_epoch = 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        self.next_epoch += 1
        for i in range(self.steps):
            yield self.x[i % len(self.x)], self.y


class BenchSession:
    """A LocalSession (one process, no checkpoints) that stamps every report with seconds since
    ``clock0``, so metrics can be plotted against wall-clock."""

    def __init__(self, device: torch.device, clock0: float, verbose: bool = False):
        self.verbose = verbose
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device = device
        self.clock0 = clock0
        self.history: list[dict] = []

    def restore(self):
        return None

    def report(self, metrics: dict, state=None) -> None:
        self.history.append({**metrics, "wall_s": time.perf_counter() - self.clock0})

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)


@contextmanager
def data_source(make: Optional[Callable]):
    """Within the block, ``train_loop`` gets its ``Data`` from ``make(cfg, session)``; ``None`` keeps
    the real ``build_data`` (FFCV / torchvision from ``data.train``)."""
    from sslray.raytrain import loop

    if make is None:
        yield
        return
    real = loop.build_data
    loop.build_data = make
    try:
        yield
    finally:
        loop.build_data = real


def run_loop(cfg, device: torch.device, make_data: Optional[Callable], clock0: Optional[float] = None,
             verbose: bool = False) -> tuple[dict, list[dict], float]:
    """``train_loop(cfg)`` on ``device`` with the given data; returns (last metrics, history, peak bytes).
    Peak: ``torch.cuda.max_memory_allocated`` (the resident dataset included) on GPU, the process's
    peak RSS so far on CPU."""
    from sslray.raytrain.loop import train_loop

    session = BenchSession(device, time.perf_counter() if clock0 is None else clock0, verbose)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with data_source(make_data):
        last = train_loop(cfg, session)
    return last, session.history, peak_bytes(device)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    s = f"{cpu}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        s = f"{p.name} ({p.total_memory / 2**30:.0f} GiB), " + s
    return s


def versions() -> str:
    import importlib.metadata as md

    out = [f"python {platform.python_version()}"]
    for pkg in ("torch", "torchvision", "timm", "kornia", "numpy", "ffcv"):
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            out.append(f"{pkg} absent")
    if torch.cuda.is_available():
        out.append(f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    stamp = REPO / ".commit"  # a source snapshot without .git (git archive) names its commit here
    if stamp.exists():
        out.append(f"sslray {stamp.read_text().strip()}")
        return ", ".join(out)
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if sha:
            out.append(f"sslray {sha}")
    except (OSError, subprocess.SubprocessError):
        pass
    return ", ".join(out)


def header(title: str, command: str, runs: int) -> str:
    return (f"\n## {title}, {datetime.now():%Y-%m-%d %H:%M}\n\n- machine: {machine()}\n- versions: {versions()}\n"
            f"- command: `{command}`\n- median of {runs} timed runs\n")


def append_table(script: str, argv, title: str, runs: int, lines: list[str], note: str = "") -> None:
    """Append one benchmark table to RESULTS.md under a header naming the exact command."""
    args = sys.argv[1:] if argv is None else argv
    cmd = "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{script}", *args])
    append_results(header(title, cmd, runs) + note + "\n" + "\n".join(lines) + "\n")


def append_results(text: str, path: Path = RESULTS) -> None:
    with open(path, "a") as f:
        f.write(text.rstrip() + "\n")
