"""Time to accuracy: kNN top-1 (k=200) on CIFAR-10 test against wall-clock, for five SSL methods.

Each method trains from its recipe (``sslray/configs/<method>_cifar10.yaml``) through
``sslray.raytrain.loop.train_loop`` unchanged, one process, no Ray/FFCV/MLflow, with the shared
CIFAR-10 (JPEG q75) GPU-resident (``sslray.datasets.resident``): all 50,000 train and 10,000 test
images as uint8 on the device, views made there. The loop's own kNN monitor (``sslray.raytrain.knn``,
bank = all train images, k=200, T=0.07) runs every ``--knn-every`` epochs.

Wall-clock: seconds since this process started (interpreter start up to the import of this
module is not counted; imports, decoding the archive or loading its .npz cache, moving the data to
the device, model build, training and every kNN evaluation are). With several ``--methods`` in one
invocation, each later run's clock starts at its own start (so run one method per invocation for
"from process start"). Per run: ``<out>/<method>.csv`` (epoch, step, wall_s, loss, knn_top1, ...)
and ``<out>/<method>.png`` (kNN top-1 vs minutes); ``--append`` adds a table to RESULTS.md.

    python benchmarks/time_to_accuracy.py --methods simclr --epochs 200 --append      # GPU
    python benchmarks/time_to_accuracy.py --tiny                                      # CPU check
    python benchmarks/time_to_accuracy.py --methods simclr --set views.local_crops=4 --tag multicrop4   # a variant
"""

from __future__ import annotations

import time

PROCESS_T0 = time.perf_counter()

import argparse  # noqa: E402
import csv  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

METHODS = {"simclr": "simclr_cifar10", "byol": "byol_cifar10", "barlowtwins": "barlowtwins_cifar10",
           "vicreg": "vicreg_cifar10", "mae": "mae_cifar10"}
# --tiny: same loop and data path, a small model, a few steps on a few hundred images.
TINY = ["model.cifar_stem=false", "model.proj_hidden_dim=64", "model.proj_out_dim=32", "data.batch_size=16",
        "train.epochs=2", "train.max_steps_per_epoch=2", "optim.warmup_epochs=0.5"]
TINY_METHOD = {"byol": ["method.params.pred_hidden_dim=64"],
               "mae": ["method.params.decoder_dim=32", "method.params.decoder_depth=1", "method.params.decoder_heads=2",
                       "method.params.patch_size=8"]}
FIELDS = ["method", "epoch", "step", "wall_s", "loss", "knn_top1", "knn_top5", "online_probe_top1", "epoch_seconds", "images_per_sec",
          "knn_seconds"]


def load_cifar(tiny: bool, cache: str, device):
    import numpy as np

    from sslray.datasets.resident import ResidentDataset, load_archive

    if tiny:  # 30 test images per class (the test split comes first in the archive): 20 train, 10 val, disjoint
        x, y, classes = load_archive(C.CIFAR_ARCHIVE, "test", per_class=30, cache_dir=cache)
        rank = np.concatenate([np.arange((y == c).sum()) for c in range(len(classes))])
        tr, va = rank >= 10, rank < 10
        return ResidentDataset(x[tr], y[tr], classes, device), ResidentDataset(x[va], y[va], classes, device)
    train = load_archive(C.CIFAR_ARCHIVE, "train", cache_dir=cache)
    test = load_archive(C.CIFAR_ARCHIVE, "test", cache_dir=cache)
    return ResidentDataset(*train, device=device), ResidentDataset(*test, device=device)


def run_method(method: str, args, clock0: float, device) -> list[dict]:
    from sslray.config import load_config
    from sslray.datasets.resident import ResidentLoader
    from sslray.raytrain.data import Data

    over = [f"train.knn_every={args.knn_every}", "train.log_every=0", "data.train=", "data.val=",
            "ray.num_workers=1", "train.knn_k=200"]
    if args.epochs:
        over.append(f"train.epochs={args.epochs}")
    if args.tiny:
        over += TINY + TINY_METHOD.get(method, [])
    cfg = load_config(METHODS[method], over + list(args.set))
    train_ds, test_ds = load_cifar(args.tiny, args.cache_dir, device)

    def resident(cfg, session):
        b = cfg.data.batch_size
        tr = ResidentLoader(train_ds, b, train=True, seed=cfg.train.seed)
        bank = ResidentLoader(train_ds, max(b, 1024), train=False)
        val = ResidentLoader(test_ds, max(b, 1024), train=False)
        steps = min(len(tr), cfg.train.max_steps_per_epoch or len(tr))
        return Data(tr, bank, val, len(train_ds.classes), steps)

    if args.budget_min:
        cfg = fit_epochs_to_budget(cfg, args, clock0, device, resident, len(train_ds))
    print(f"{method}: {cfg.model.backbone}, batch {cfg.data.batch_size}, {cfg.train.epochs} epochs on "
          f"{len(train_ds)} resident images ({device})", flush=True)
    _, hist, peak = C.run_loop(cfg, device, resident, clock0=clock0, verbose=args.verbose)
    rows = [{"method": method, **{k: m.get(k, "") for k in FIELDS[1:]}} for m in hist if not m.get("partial")]
    print(f"{method}: peak memory {peak / 2**20:,.0f} MiB", flush=True)
    return rows


def fit_epochs_to_budget(cfg, args, clock0: float, device, make_data, n_train: int):
    """Pick ``train.epochs`` so the run ends within ``--budget-min`` minutes of ``clock0``: time two
    epochs of 30 steps (the second one counts: the first pays cuDNN autotuning and allocator warm-up)
    and one kNN evaluation in a throw-away run of the same config (its time counts against the budget,
    as everything since the clock started does), then fit whole epochs into what is left, 5% spare."""
    probe = cfg.replace(**{"train.epochs": 2, "train.max_steps_per_epoch": min(30, cfg.train.max_steps_per_epoch or 30),
                           "train.knn_every": 2})
    _, hist, _ = C.run_loop(probe, device, make_data)
    m = [h for h in hist if not h.get("partial")][-1]
    epoch_s = n_train / m["images_per_sec"]
    knn_s = float(m.get("knn_seconds", 0.0))
    left = args.budget_min * 60 * 0.95 - (time.perf_counter() - clock0)
    per_epoch = epoch_s + knn_s / max(1, args.knn_every)
    epochs = max(1, int((left - knn_s) // per_epoch))  # the last epoch always evaluates
    # the recipe's warm-up keeps its share of the schedule (10 of 200 epochs -> 5%)
    warmup = cfg.optim.warmup_epochs * min(1.0, epochs / cfg.train.epochs)
    print(f"budget {args.budget_min} min: ~{epoch_s:.2f} s/epoch, {knn_s:.2f} s per kNN evaluation, "
          f"{left:.0f} s left -> {epochs} epochs, {warmup:.2g} warm-up", flush=True)
    return cfg.replace(**{"train.epochs": epochs, "optim.warmup_epochs": warmup})


def write_outputs(name: str, rows: list[dict], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"{name}.csv", out / f"{name}.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["wall_s"] / 60, 100 * r["knn_top1"]) for r in rows if r["knn_top1"] != ""]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if pts:
        ax.plot(*zip(*pts), marker="o")
    ax.set_xlabel("wall-clock from start (min)")
    ax.set_ylabel("kNN top-1 on CIFAR-10 test (%)")
    ax.set_title(f"{name}: kNN (k=200) vs time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--epochs", type=int, default=0, help="override the recipe's epochs")
    ap.add_argument("--budget-min", type=float, default=0.0,
                    help="fit the epoch count so each method ends within this many minutes of its clock start")
    ap.add_argument("--knn-every", type=int, default=5, help="epochs between kNN evaluations")
    ap.add_argument("--tiny", action="store_true", help="CPU check: small models, 2 epochs of 2 steps, 200 images")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", default=C.DEFAULT_CACHE)
    ap.add_argument("--out", default="benchmarks/tta", help="folder for the CSVs and PNGs")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides, key=value")
    ap.add_argument("--tag", default="",
                    help="names a variant (e.g. a --set recipe change): files <out>/<method>-<tag>.csv/.png, "
                         "table rows 'method (tag)', so it sits beside the recipe's own run")
    ap.add_argument("--append", action="store_true", help="append a summary table to benchmarks/RESULTS.md")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        args.knn_every = 1
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
    device = C.device_of(args.device)
    out = Path(args.out)
    lines = ["| method | epochs | kNN top-1 at the end | wall to end | best kNN (epoch, wall) | csv / png |",
             "| --- | --- | --- | --- | --- | --- |"]
    for i, method in enumerate(methods):
        clock0 = PROCESS_T0 if i == 0 else time.perf_counter()
        rows = run_method(method, args, clock0, device)
        name = f"{method}-{args.tag}" if args.tag else method
        csv_path, png_path = write_outputs(name, rows, out)
        knn = [r for r in rows if r["knn_top1"] != ""]
        best = max(knn, key=lambda r: r["knn_top1"])
        last = rows[-1]
        label = f"{method} ({args.tag})" if args.tag else method
        lines.append(f"| {label} | {last['epoch']} | {100 * last['knn_top1']:.1f}% | {last['wall_s'] / 60:.2f} min | "
                     f"{100 * best['knn_top1']:.1f}% ({best['epoch']}, {best['wall_s'] / 60:.2f} min) | "
                     f"{csv_path.name} / {png_path.name} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.append:
        title = "Time to accuracy on CIFAR-10, GPU-resident data, one process"
        if args.tiny or device.type == "cpu":
            title += " (CPU --tiny: a correctness check, NOT performance)"
        C.append_table("time_to_accuracy.py", argv, title, 1, lines, f"\nCSVs and curves in `{out}/`.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
