"""Training-step throughput: images/s of sslray's real per-worker step, real data vs synthetic.

For each (method, backbone) row, ``sslray.raytrain.loop.train_loop`` runs unchanged (views on the
device via MultiView, model via create_method, loss, optimizer via sslray.raytrain.optim with the
warmup-cosine lr, bf16 autocast + channels_last on GPU), fed from
  * resident: the real images, all uint8 on the device (``sslray.datasets.resident``): CIFAR-10
    train for the 32-px rows, Imagenette train (224 px) for the 224-px rows;
  * ffcv: the real ``build_data`` on a .beton (only with ``--beton32/--beton224`` and ffcv importable);
  * synthetic: random uint8 batches already on the device (the model-bound ceiling of the same step).
Each "run" is one epoch of ``--steps`` steps (the loop synchronises the device at its end and times
it); the first epoch is warm-up and not counted; the median of ``--runs`` epochs is reported with
the real/synthetic ratio and the peak memory. One table is printed; ``--append`` adds it to
benchmarks/RESULTS.md with date, machine, versions and this command.

    python benchmarks/throughput.py --append                  # GPU: every row
    python benchmarks/throughput.py --tiny                    # CPU correctness check (< 1 min)
    python benchmarks/throughput.py --rows 4 --compare model.compile=true   # an option's effect, as a ratio
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

import torch  # noqa: E402


@dataclass(frozen=True)
class Row:
    name: str
    recipe: str
    batch: int
    res: int  # decode res = crop size (px)
    overrides: tuple[str, ...] = field(default=())
    tiny: tuple[str, ...] = field(default=())  # --tiny: same family and code path, a cheap model


TINY_RESNET = ("model.backbone=resnet18", "model.cifar_stem=false", "model.proj_hidden_dim=64",
               "model.proj_out_dim=32")


R18 = ("model.backbone=resnet18", "model.cifar_stem=true")
ROWS = [
    Row("SimCLR ResNet-18 (CIFAR stem)", "simclr_cifar10", 512, 32, R18, TINY_RESNET),
    Row("SimCLR ResNet-50", "simclr_cifar10", 256, 224,
        ("model.backbone=resnet50", "model.cifar_stem=false", "views.blur=false"), TINY_RESNET),
    Row("MAE ViT-B/16, mask 0.75", "mae_cifar10", 256, 224,
        ("model.backbone=vit_base_patch16_224", "method.params.patch_size=16", "method.params.mask_ratio=0.75",
         "method.params.decoder_dim=512", "method.params.decoder_depth=8", "method.params.decoder_heads=16"),
        ("model.backbone=vit_tiny_patch16_224", "method.params.patch_size=8", "method.params.decoder_dim=32",
         "method.params.decoder_depth=1", "method.params.decoder_heads=2")),
    Row("BYOL ResNet-18 (CIFAR stem)", "byol_cifar10", 512, 32, R18,
        TINY_RESNET + ("method.params.pred_hidden_dim=64",)),
    Row("Barlow Twins ResNet-18 (CIFAR stem)", "barlowtwins_cifar10", 512, 32, R18, TINY_RESNET),
    Row("VICReg ResNet-18 (CIFAR stem)", "vicreg_cifar10", 512, 32, R18, TINY_RESNET),
]


def row_config(row: Row, batch: int, res: int, steps: int, runs: int, extra: list[str], tiny: bool = False):
    from sslray.config import load_config

    return load_config(row.recipe, [
        *row.overrides, *(row.tiny if tiny else ()), f"data.batch_size={batch}", f"data.decode_res={res}",
        f"views.crop_size={res}",
        "data.train=", "data.val=", f"train.epochs={runs + 1}", f"train.max_steps_per_epoch={steps}",
        "train.log_every=0", "train.knn_every=1000000", "ray.num_workers=1", *extra])


_REAL: dict = {}


def real_dataset(res: int, tiny: bool, cache: str, device: torch.device):
    """The real images for a row, resident on the device (loaded once per res)."""
    from sslray.datasets.resident import ResidentDataset, load_archive

    if res not in _REAL:
        _REAL.clear()  # one resident set at a time: the 224-px one is ~1.4 GiB
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        archive = C.CIFAR_ARCHIVE if (res <= 64 or tiny) else C.IMAGENETTE_ARCHIVE
        split = "test" if tiny else "train"  # tiny: CIFAR's test split comes first in the archive
        x, y, classes = load_archive(archive, split, res=res, per_class=8 if tiny else 0, cache_dir=cache)
        _REAL[res] = (ResidentDataset(x, y, classes, device), archive.name)
    return _REAL[res]


def measure(cfg, device, make_data, runs: int) -> dict:
    from sslray.raytrain.data import Data  # noqa: F401

    _, hist, peak = C.run_loop(cfg, device, make_data)
    rates = [m["images_per_sec"] for m in hist[1:]]  # epoch 1 = warm-up
    assert len(rates) == runs, f"expected {runs} timed epochs, got {len(rates)}"
    return {"median": C.median(rates), "runs": rates, "peak": peak, "loss": hist[-1]["loss"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true",
                    help="CPU correctness check: each family on a small model, batch 8, 32 px, 1 step per run")
    ap.add_argument("--rows", default="", help="comma-separated row numbers (1-based) to run; default all")
    ap.add_argument("--steps", type=int, default=0, help="steps per timed run (default 30; tiny 1)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per figure (median reported)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", default=C.DEFAULT_CACHE, help="where decoded datasets are cached as .npz")
    ap.add_argument("--beton32", default="", help="CIFAR-10 train .beton for an FFCV row (needs ffcv)")
    ap.add_argument("--beton224", default="", help="Imagenette train .beton for an FFCV row (needs ffcv)")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides for every row, key=value")
    ap.add_argument("--compare", nargs="*", default=[],
                    help="also time the real-data step with these overrides (key=value), side by side, as a ratio")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    device = C.device_of(args.device)
    steps = args.steps or (1 if args.tiny else 30)
    rows = ROWS if not args.rows else [ROWS[int(i) - 1] for i in args.rows.split(",")]
    from sslray.datasets.resident import ResidentLoader
    from sslray.raytrain.data import Data

    cmp_col = f" vs {' '.join(args.compare)} |" if args.compare else ""
    lines = ["| step | batch | px | data path | images/s (median) | runs | real / synthetic | peak memory |" + cmp_col,
             "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if args.compare else "")]
    print(lines[0], "\n" + lines[1], flush=True)
    mem = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
    for row in rows:
        batch, res = (8, 32) if args.tiny else (row.batch, row.res)
        cfg = row_config(row, batch, res, steps, args.runs, args.set, args.tiny)
        batch = cfg.data.batch_size  # --set data.batch_size=N times the row at another batch
        name = row.name if not args.tiny else (
            f"{row.name} [tiny: ran {cfg.model.backbone}{', CIFAR stem' if cfg.model.cifar_stem else ''}]")
        results = []
        ds, src = real_dataset(res, args.tiny, args.cache_dir, device)

        def resident(cfg, session, ds=ds):
            tr = ResidentLoader(ds, cfg.data.batch_size, train=True, seed=cfg.train.seed)
            return Data(tr, None, None, len(ds.classes), min(len(tr), steps))

        if len(ds) // batch < steps:
            print(f"warning: {src} holds {len(ds)} images, fewer than {steps} steps x {batch}", file=sys.stderr)
        results.append((f"resident ({src})", measure(cfg, device, resident, args.runs)))
        if args.compare:  # same row, same data, same process: the overrides' effect as a ratio
            vcfg = row_config(row, batch, res, steps, args.runs, args.set + args.compare, args.tiny)
            results.append((f"resident ({src}), {' '.join(args.compare)}", measure(vcfg, device, resident, args.runs)))
        beton = args.beton32 if res <= 64 else args.beton224
        if beton and C.importable("ffcv"):
            fcfg = cfg.replace(**{"data.train": beton})
            results.append((f"ffcv ({Path(beton).name})", measure(fcfg, device, None, args.runs)))
        if not args.no_synthetic:
            synth = lambda cfg, session: Data(C.SyntheticLoader(batch, res, steps, device), None, None, 10, steps)  # noqa: E731
            results.append(("synthetic uint8 on device", measure(cfg, device, synth, args.runs)))
        ceiling = results[-1][1]["median"] if not args.no_synthetic else float("nan")
        for path, r in results:
            ratio = r["median"] / ceiling if ceiling == ceiling else float("nan")
            line = (f"| {name} | {batch} | {res} | {path} | {r['median']:,.1f} | "
                    f"{', '.join(f'{v:,.1f}' for v in r['runs'])} | {ratio:.2f} | "
                    f"{r['peak'] / 2**20:,.0f} MiB ({mem}) |")
            if args.compare:
                line += f" {r['median'] / results[0][1]['median']:.2f}x |" if path.startswith("resident") else " - |"
            lines.append(line)
            print(line, flush=True)
    if args.append:
        title = "Throughput: sslray's training step, real vs synthetic data"
        if args.tiny or device.type == "cpu":
            title += " (CPU --tiny: a correctness check, NOT performance)"
        note = (f"\nEach run = one epoch of {steps} steps of `train_loop` (first epoch = warm-up, excluded); "
                f"device synchronised at each epoch's end. ratio = row / synthetic row of the same step.\n")
        if args.compare:
            note += (f"The last column: images/s with `{' '.join(args.compare)}` over images/s without, real data, "
                     "same process (each with its own warm-up epoch).\n")
        C.append_table("throughput.py", argv, title, args.runs, lines, note)
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    sys.exit(rc)
