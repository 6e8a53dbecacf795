"""`sslray demo` / `make demo`: real CIFAR-10 end to end on whatever this machine has.

extract the archive -> convert train and test to .beton -> SimCLR on Ray Train (2 workers) ->
kNN each epoch -> linear probe + kNN beside a random-init backbone -> everything in MLflow.
A GPU, when present, gets the full-size recipe; on CPU a subset and a lighter stem keep it to
about a quarter of an hour on 2 cores.
"""

from __future__ import annotations

import tarfile
import time
from pathlib import Path

from .config import load_config

REPO = Path(__file__).resolve().parents[1]
ARCHIVE_CANDIDATES = [REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz",
                      Path.cwd().parent / "shared" / "data" / "cifar10-jpeg.tar.gz"]


def find_archive(given: str | None) -> Path:
    for p in ([Path(given)] if given else ARCHIVE_CANDIDATES):
        if p.exists():
            return p
    raise FileNotFoundError(
        f"CIFAR-10 archive not found (looked at {', '.join(map(str, ARCHIVE_CANDIDATES))}); pass --archive PATH")


def extract(archive: Path, dest: Path) -> Path:
    """Extract once; a marker file says the extraction finished."""
    root = dest / "cifar10"
    marker = root / ".extracted"
    if marker.exists():
        if marker.read_text() != str(archive):
            print(f"demo: {root} holds {marker.read_text()}, extracted before; using it (not {archive}). "
                  f"Give another --data-dir to use {archive}")
        return root
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError as e:
        raise FileNotFoundError(f"--archive {archive} is not a tar archive of CIFAR-10 ImageFolder splits "
                                f"({e})") from None
    root.mkdir(parents=True, exist_ok=True)
    print(f"demo: extracting {archive} -> {root}")
    with tf:
        tf.extractall(root, filter="data")
    marker.write_text(str(archive))
    return root


def prepare(data_dir: str, archive: str | None = None) -> tuple[str, str]:
    from .datasets import WriteParams, convert

    dest = Path(data_dir).resolve()
    root = extract(find_archive(archive), dest)
    params = WriteParams(write_mode="jpg", max_resolution=32, jpeg_quality=90)
    out = {}
    for split in ("train", "test"):
        beton = dest / f"cifar10_{split}.beton"
        convert(root, beton, split=split, params=params)
        out[split] = str(beton)
    return out["train"], out["test"]


def run_demo(a) -> int:
    import torch

    from .cli import run_pretrain

    t0 = time.time()
    recipe = "simclr_cifar10" if torch.cuda.is_available() else "demo_cpu"
    fixed = [f"ray.num_workers={a.workers}"]
    if a.epochs:
        fixed.append(f"train.epochs={a.epochs}")
    if a.train_subset is not None:
        fixed.append(f"data.train_subset={a.train_subset}")
    if a.tracking_uri:
        fixed.append(f"tracking.tracking_uri={a.tracking_uri}")
    load_config(recipe, fixed + list(a.overrides))  # a typo in the overrides, before minutes of extraction
    train, test = prepare(a.data_dir, a.archive)
    cfg = load_config(recipe, [f"data.train={train}", f"data.val={test}", *fixed, *a.overrides])
    print(f"demo: recipe {recipe} ({'GPU' if torch.cuda.is_available() else 'CPU'}), "
          f"{cfg.train.epochs} epochs on {cfg.data.train_subset or 50000} training images")
    run = run_pretrain(cfg, probe=True, probe_train_subset=cfg.data.train_subset,
                       probe_val_subset=cfg.data.val_subset)
    report = run.probe
    print(f"demo: finished in {(time.time() - t0) / 60:.1f} min. Browse it with: "
          f"sslray ui --tracking-uri {run.tracking_uri}")
    if report is not None and report.pretrained["knn_top1"] <= report.random_init["knn_top1"]:
        print("demo: warning: pretrained kNN did not beat the random-init backbone; train longer (--epochs)")
    return 0
