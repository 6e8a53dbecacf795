"""Loader benchmark: images/s of the complete two-view SimCLR pipeline on Imagenette at 224 px.

Side by side, in one run, with the same CPU count (decode + every augmentation, both views ready as
normalised float tensors):
  * sslray: FFCV .beton (jpg q90, max-res 256) -> uint8 batches -> ViewAugment x 2, with the default
    fused backend and with the kornia backend
  * baseline: torchvision ImageFolder + DataLoader + PIL transforms (SimCLR's recipe) x 2 views
  * context rows: FFCV decode alone; ViewAugment alone per op on synthetic uint8 batches.

Each pipeline runs in its own subprocess (so peak RSS, summed over the process and its DataLoader
children, is its own); the median of --runs timed passes over --images images is reported after one
warm-up batch (numba / kornia first-call costs are not throughput). Prints one table; with
--append, appends it to benchmarks/RESULTS.md with date, machine, versions and the command.

    nice python benchmarks/loader.py --runs 3 --images 1024 --append
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "imagenette2-224.tar.gz"
SIZE = 224


def simclr_spec(size: int = SIZE):
    """SimCLR's ImageNet recipe (Chen et al. 2020, appendix A): crop 0.08-1, flip, jitter 0.8 (p 0.8),
    grey 0.2, blur p 0.5, two views."""
    from sslray.datasets.views import PRESETS

    return PRESETS.get("simclr")(size=size, min_scale=0.08, jitter_strength=1.0, blur=True)


class TwoViews:
    def __init__(self, t):
        self.t = t

    def __call__(self, img):
        return self.t(img), self.t(img)


def torchvision_transform(size: int = SIZE):
    from torchvision import transforms as T

    from sslray.datasets.views import IMAGENET_MEAN, IMAGENET_STD

    return TwoViews(T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]))


def timed(batches, images: int, runs: int, per_batch) -> list[float]:
    """images/s of ``runs`` passes of ``images`` images each, after one warm-up batch."""
    it = iter(batches())
    per_batch(next(it))
    rates = []
    for _ in range(runs):
        n, t0 = 0, time.perf_counter()
        while n < images:
            try:
                b = next(it)
            except StopIteration:
                it = iter(batches())
                b = next(it)
            n += per_batch(b)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def run_pipeline(name: str, a) -> list[float]:
    import torch

    torch.set_num_threads(a.cpus)
    cpu = torch.device("cpu")
    if name in ("ffcv_views", "ffcv_views_kornia", "ffcv_decode"):
        from sslray.datasets import make_loader
        from sslray.datasets.views import MultiView

        loader = make_loader(a.beton, a.batch, res=SIZE, device=cpu, train=True, num_workers=a.cpus)
        views = MultiView(simclr_spec(), backend="kornia" if name == "ffcv_views_kornia" else "fused")

        def step(b):
            x, _ = b
            if name != "ffcv_decode":
                v = views(x)
                assert len(v) == 2 and v[0].dtype == torch.float32 and v[0].shape[-1] == SIZE
            return len(x)

        return timed(lambda: loader, a.images, a.runs, step)
    if name == "torchvision":
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(a.tree, transform=torchvision_transform())
        dl = DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.cpus, drop_last=True,
                        persistent_workers=True, prefetch_factor=2)

        def step(b):
            (v1, v2), _ = b
            assert v1.dtype == torch.float32 and v2.shape[-1] == SIZE
            return len(v1)

        return timed(lambda: dl, a.images, a.runs, step)
    raise SystemExit(f"unknown pipeline {name}")


def per_op_rates(cpus: int, batch: int = 64) -> dict[str, float]:
    """views/s of each ViewAugment op alone on a synthetic uint8 batch at 224: what limits the CPU rate."""
    import torch

    from sslray.datasets.views import ViewAugment

    torch.set_num_threads(cpus)
    p = simclr_spec()[0][0]
    aug = ViewAugment(p)
    x = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8)
    xf = aug.ops[0](x.float() / 255)
    out = {}
    for op in aug.ops:
        inp = x.float() / 255 if op is aug.ops[0] else xf
        op(inp)
        t0 = time.perf_counter()
        for _ in range(2):
            op(inp)
        out[type(op).__name__] = 2 * batch / (time.perf_counter() - t0)
    aug(x)
    t0 = time.perf_counter()
    aug(x)
    out["whole kornia ViewAugment (1 view)"] = batch / (time.perf_counter() - t0)
    from sslray.datasets.views import FusedViewAugment

    fused = FusedViewAugment(p)
    fused(x)
    t0 = time.perf_counter()
    fused(x)
    out["whole FusedViewAugment (1 view)"] = batch / (time.perf_counter() - t0)
    return out


def peak_rss_of(proc: subprocess.Popen) -> tuple[int, threading.Thread]:
    import psutil

    peak = [0]

    def poll():
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                    peak[0] = max(peak[0], rss)
                except psutil.Error:
                    pass
                time.sleep(0.2)
        except psutil.Error:
            pass

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    return peak, t


def prepare(a) -> None:
    """Extract Imagenette train and convert it to .beton once (kept under --workdir)."""
    work = Path(a.workdir)
    tree = work / "imagenette" / "train"
    if not tree.is_dir():
        with tarfile.open(a.archive) as tf:
            members = [m for m in tf if "/train/" in f"/{m.name}" or m.name.startswith("train/")]
            tf.extractall(work / "imagenette", members=members, filter="data")
        found = next((work / "imagenette").rglob("train"))
        if found != tree:
            found.rename(tree)
    a.tree = str(tree)
    a.beton = str(work / "imagenette-train.beton")
    from sslray.datasets import WriteParams, convert

    t0 = time.time()
    m = convert(tree, a.beton, params=WriteParams(write_mode="jpg", max_resolution=256, jpeg_quality=90),
                workers=a.cpus, verbose=False)
    a.convert_note = (f"{m['num_images']} images, {m['beton_bytes'] / 2**20:.0f} MiB, "
                      f"converted in {m.get('seconds', round(time.time() - t0, 1))} s")


def versions() -> str:
    import ffcv
    import kornia
    import numpy
    import PIL
    import torch
    import torchvision

    return (f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"ffcv {ffcv.__version__}, kornia {kornia.__version__}, numpy {numpy.__version__}, pillow {PIL.__version__}")


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", default=str(ARCHIVE))
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sslray-bench-loader"))
    ap.add_argument("--cpus", type=int, default=2, help="decode workers / torch threads for every pipeline")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--images", type=int, default=1024, help="images per timed run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--_run", help=argparse.SUPPRESS)
    ap.add_argument("--_tree", help=argparse.SUPPRESS)
    ap.add_argument("--_beton", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._run:  # child: one pipeline, rates as JSON on the last line
        a.tree, a.beton = a._tree, a._beton
        print(json.dumps(run_pipeline(a._run, a)))
        return 0

    prepare(a)
    rows = []
    for name, label in (("torchvision", "torchvision ImageFolder + DataLoader + PIL transforms, 2 views"),
                        ("ffcv_views", "sslray FFCV + fused views (CPU), 2 views"),
                        ("ffcv_views_kornia", "sslray FFCV + kornia views (CPU), 2 views"),
                        ("ffcv_decode", "sslray FFCV decode only (uint8 batches, no views)")):
        cmd = [sys.executable, __file__, "--_run", name, "--_tree", a.tree, "--_beton", a.beton,
               "--cpus", str(a.cpus), "--batch", str(a.batch), "--images", str(a.images), "--runs", str(a.runs)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        peak, poller = peak_rss_of(proc)
        out, _ = proc.communicate()
        poller.join(timeout=1)
        if proc.returncode:
            raise SystemExit(f"{name} failed (exit {proc.returncode})")
        rates = json.loads(out.strip().splitlines()[-1])
        rows.append((name, label, statistics.median(rates), rates, peak[0]))
        print(f"{label}: median {statistics.median(rates):.0f} img/s {[round(r) for r in rates]}", flush=True)
    base = rows[0][2]
    ops = per_op_rates(a.cpus)

    lines = [
        "| pipeline (Imagenette train, 224 px, batch %d, %d CPUs) | images/s, median of %d | runs | peak RSS | vs torchvision |"
        % (a.batch, a.cpus, a.runs),
        "| --- | --- | --- | --- | --- |",
    ]
    for _, label, med, rates, rss in rows:
        lines.append(f"| {label} | {med:,.0f} | {', '.join(f'{r:.0f}' for r in rates)} | "
                     f"{rss / 2**20:,.0f} MiB | {med / base:.2f}x |")
    lines += ["", "Views alone on the CPU (synthetic uint8 batch of 64 at 224 px), views/s: each kornia op, then each "
              "whole backend:", "",
              "| op | views/s |", "| --- | --- |"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in ops.items()]
    table = "\n".join(lines)
    print()
    print(table)
    if a.append:
        cmd = "nice python benchmarks/loader.py " + " ".join(
            f"--{k} {v}" for k, v in (("cpus", a.cpus), ("batch", a.batch), ("images", a.images), ("runs", a.runs))
        ) + " --append"
        results = REPO / "benchmarks" / "RESULTS.md"
        if not results.exists():
            results.write_text("# Benchmark results\n\nEach section: date, machine, versions, exact command, "
                               "median of N runs. Reference figures: ../shared/ANCHORS.md.\n")
        with open(results, "a") as f:
            f.write(f"\n## Loader: two-view SimCLR pipeline, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
                    f"- machine: {machine()} (shared with other developers' jobs while measured: "
                    f"load average {os.getloadavg()[0]:.1f} at the end)\n"
                    f"- versions: {versions()}\n- data: {a.convert_note}\n- command: `{cmd}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
