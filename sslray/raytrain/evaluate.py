"""`sslray probe`: frozen features from a checkpoint -> linear probe + kNN, beside a random-init baseline."""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import Config, ConfigError, from_dict
from ..datasets.loader import check_same_classes, dataset_info, make_loader
from ..datasets.views import eval_transform
from ..storage import check_one_run, checkpoint_order, fetch_checkpoint, is_remote
from .knn import knn_accuracy
from .rng import seed_everything
from .methods import create_method
from .probe import ProbeResult
from .session import STATE_FILE, pick_device


def find_state(checkpoint: str | os.PathLike) -> Path:
    """Accept a state.pt, a checkpoint folder, or a run folder (newest checkpoint inside); local or a
    URI such as ``s3://bucket/runs/name`` (that checkpoint is copied into the local cache first). A
    folder holding the checkpoints of several runs (the storage root, or a run beside its
    ``--restart``-moved ``<name>.old-<time>``) is refused, naming the runs: which one is meant?"""
    if is_remote(checkpoint):
        return fetch_checkpoint(str(checkpoint), STATE_FILE)
    p = Path(checkpoint)
    if p.is_file():
        return p
    if (p / STATE_FILE).exists():
        return p / STATE_FILE
    found = sorted(p.glob(f"**/{STATE_FILE}"), key=lambda f: (checkpoint_order(f.parent.name), f.stat().st_mtime))
    if not found:
        raise FileNotFoundError(f"no checkpoint ({STATE_FILE}) under {p}")
    check_one_run([f.relative_to(p).as_posix() for f in found], str(p))
    # A node lost while its checkpoint was being copied leaves the newest file cut short (Ray resumes
    # from the last one it registered and never removes it): a torch file is a zip archive, whose
    # directory is written last, so a cut one is passed over for the newest whole one.
    for f in reversed(found):
        if zipfile.is_zipfile(f):
            if f != found[-1]:
                print(f"sslray: {found[-1]} is cut short (a copy that never finished); using {f}")
            return f
    return found[-1]  # none is whole: reading it names the file and the reason


CHECKPOINT = f"an sslray checkpoint, a {STATE_FILE} written by sslray pretrain"


# torch.save's old (pre-zip) format starts with its magic number, pickled
_LEGACY_TORCH = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


def _torch_bytes(path: Path) -> bool:
    """Whether ``path`` looks like a torch file (a zip archive, or the old pickle format) or safetensors."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return True  # unreadable: the reader's own error says why
    return (head.startswith(b"PK\x03\x04") or head.startswith(_LEGACY_TORCH)  # a zip, maybe cut short
            or (path.suffix == ".safetensors" and len(head) >= 8))


def read_file(path: Path, load: Callable[[Path], Any], expected: str, where: str = "") -> Any:
    """``load(path)``; whatever the reader finds wrong in the file (an image, a truncated torch zip,
    another tool's pickle) becomes a ValueError naming the file and what it should have been. Serves
    ``read_checkpoint`` and ``--init-weights``' ``sslray.export.read_weights``."""
    try:
        return load(path)
    except (MemoryError, torch.OutOfMemoryError):  # the file may be fine: the device or host is full
        raise
    except OSError as e:  # a folder, no permission...: the file may be fine, it could not be read
        raise ValueError(f"{where}cannot read {path} ({type(e).__name__}: {e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - name the file, whatever the reader found wrong in it
        said = f"{type(e).__name__}: " + " ".join(str(e).split())  # one line: torch's messages run over several
        if not _torch_bytes(path):
            # torch reads other bytes as its old pickle format and says "KeyError: <a number>" or
            # "Weights only load failed ... set weights_only=False", which would be the wrong advice
            said = "its bytes are neither a torch file nor a safetensors one"
        raise ValueError(f"{where}{path} is not {expected} ({said})") from None


def read_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Config, dict]:
    """The config and the whole state of an sslray checkpoint file (a local state.pt, as ``find_state``
    returns it). Anything else (an image, a truncated file, a plain state_dict) is a ValueError
    naming the file and what was expected."""
    path = Path(path)
    # The loop's checkpoint also holds RNG states (numpy arrays), which torch's weights-only reader refuses.
    state = read_file(path, lambda p: torch.load(p, map_location=device, weights_only=False), CHECKPOINT)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not {CHECKPOINT}")
    if not isinstance(state.get("config"), dict):
        raise ValueError(f"{path} holds no sslray config (a plain state_dict? give it to --init-weights / "
                         f"model.init_weights instead); expected {CHECKPOINT}")
    if not isinstance(state.get("model"), dict):
        raise ValueError(f"{path} holds no 'model' state_dict; expected {CHECKPOINT}")
    try:
        cfg = from_dict(state["config"])
    except ConfigError as e:
        raise ConfigError(f"{path}: the checkpoint's config: {e}") from None
    return cfg, state


def load_checkpoint(checkpoint: str | os.PathLike, device: torch.device):
    cfg, state = read_checkpoint(find_state(checkpoint), device)
    model = create_method(cfg).to(device)
    model.load_state_dict(state["model"])
    return cfg, model, state


RANDOM_INIT_SEED_OFFSET = 12345  # the baseline's init seed is cfg.train.seed + this, in every protocol


def random_init_model(cfg: Config):
    """The same method and backbone with a fresh seeded init: the baseline every probe reports beside."""
    seed_everything(cfg.train.seed + RANDOM_INIT_SEED_OFFSET)
    return create_method(cfg)


@dataclass
class ProbeReport:
    pretrained: dict
    random_init: dict  # empty when the baseline was skipped (random_baseline=False)
    probe: ProbeResult
    random_probe: Optional[ProbeResult]
    classes: list[str]
    extra: dict = field(default_factory=dict)
    pictures: dict = field(default_factory=dict)  # name -> PNG bytes, logged under probe/

    def table_rows(self) -> list[tuple[str, Optional[float], float, Optional[float]]]:
        """(metric, random init, pretrained, gain); random init and gain are None without a baseline, and a
        chosen C (``linear_c``) has no gain."""
        keys = ["knn_top1", "linear_top1", "linear_top5", "linear_macro_f1"]
        keys += ["linear_c"] if "linear_c" in self.pretrained else []
        rows = []
        for k in keys:
            r, p = self.random_init.get(k), self.pretrained[k]
            rows.append((k, r, p, None if r is None or k == "linear_c" else p - r))
        return rows


def _retrieval(backbone, train, val, tr_idx, va_idx, cfg: Config, device, batch_size, log) -> dict:
    """kNN retrieval grid after probing: ``monitor.num_images`` val queries and their top-8 neighbours among
    at most ``MAX_BANK`` train images, each a sample spread over its (class-sorted) split and seeded by
    ``train.seed``, so every class can show and a checkpoint's grid shows the same images each time."""
    from .. import plots
    from ..datasets.loader import spread_subset
    from .pictures import MAX_BANK, RETRIEVAL_PNG, first_images, retrieval_figure

    def loader(path, idx, n):
        pick = spread_subset(idx, dataset_info(path).num_images, n, cfg.train.seed)
        return make_loader(path, max(1, min(batch_size, len(pick))), res=cfg.data.decode_res, device=device,
                           train=False, indices=pick, num_workers=cfg.data.loader_workers)

    try:
        queries = first_images(loader(val, va_idx, cfg.monitor.num_images), cfg.monitor.num_images)
        fig = retrieval_figure(backbone, loader(train, tr_idx, MAX_BANK), queries, eval_transform(cfg.views).to(device),
                               device, cfg.train.precision, title=f"{cfg.method.name} kNN retrieval (probe)")
        return {RETRIEVAL_PNG: plots.png_bytes(fig)}
    except Exception as e:  # noqa: BLE001 - a picture is never worth a failed probe
        log(f"probe: retrieval grid skipped ({type(e).__name__}: {e})")
        return {}


def probe_checkpoint(checkpoint: str, train: str, val: str, *, train_subset: int = 0, val_subset: int = 0,
                     knn_k: int = 200, use_gpu: str = "auto", batch_size: int = 512,
                     random_baseline: bool = True, linear_c=(1.0,), log=print, store=None) -> ProbeReport:
    """kNN and linear probe of the pretrained backbone and of its random-init baseline on frozen features.
    ``random_baseline=False`` extracts and fits nothing for the baseline (``report.random_init`` is empty).
    ``linear_c``: the probe's C, or several to choose from on held-out train features (``fit_linear_probe``).

    The features and linear fits are an ``sslray.eval.FeatureStore``'s, the same the eval protocols read.
    ``store``: one of this checkpoint, data, subsets and device, kept for the protocols that follow
    (``sslray pretrain --eval``; ``batch_size`` is then the store's); without one, a store that caches
    nothing serves this probe alone."""
    from ..eval.features import FeatureStore  # sslray.eval imports this module
    from ..eval.source import source_kind
    from .probe import linear_cs

    if store is None and source_kind(checkpoint) != "checkpoint":
        raise ValueError(f"sslray probe takes an sslray checkpoint (state.pt); {checkpoint} is an sslray "
                         f"{source_kind(checkpoint)} source: score it with `sslray eval --checkpoint {checkpoint} "
                         "--protocol linear,knn`")
    cs = linear_cs(linear_c)  # a bad C fails before any feature is extracted
    train_info, info = dataset_info(train), dataset_info(val)
    classes = check_same_classes(train_info, info)  # before any model is loaded or feature extracted
    device = pick_device(0, use_gpu)
    own = store is None  # a store made here serves this probe alone: each init's features go once scored
    if own:
        store = FeatureStore(checkpoint, train, val, train_subset=train_subset, val_subset=val_subset,
                             use_gpu=use_gpu, batch_size=batch_size, cache=False, log=log)
    else:
        store.serves(checkpoint, train, val, train_subset=train_subset, val_subset=val_subset, use_gpu=use_gpu)
    cfg, tr_idx, va_idx = store.cfg, store.train_idx, store.val_idx

    def evaluate(init, label):
        f = store.get(init)  # float32/int64 copies of the extracted tensors: the kNN scores what it would on them
        ftr, ytr, fva, yva = (torch.from_numpy(a).to(device) for a in (f.train_x, f.train_y, f.val_x, f.val_y))
        knn = knn_accuracy(fva, yva, ftr, ytr, len(classes), knn_k, cfg.train.knn_temperature)
        log(f"probe: fitting the {label} linear probe on {len(ytr)} images ...")
        res = store.linear(init, cs)
        flat = {"knn_top1": knn["knn_top1"], "knn_top5": knn["knn_top5"],
                **{f"linear_{k}": v for k, v in res.metrics.items()}}
        if len(cs) > 1:  # a chosen C is a result; one given C is the setting it always was
            flat["linear_c"] = res.C
        if own:
            del f, ftr, ytr, fva, yva
            store.release(init)
        return flat, res

    pre, pre_res = evaluate("pretrained", "pretrained")
    pictures = _retrieval(store.backbone("pretrained"), train, val, tr_idx, va_idx, cfg, device, store.batch_size, log)
    rnd, rnd_res = evaluate("random_init", "random-init") if random_baseline else ({}, None)
    extra = {"probe_train_images": int(len(tr_idx) if tr_idx is not None else train_info.num_images),
             "probe_val_images": int(len(va_idx) if va_idx is not None else info.num_images),
             "linear_converged": pre_res.converged}
    if len(cs) > 1:
        extra["linear_c_heldout_top1"] = {f"{c:g}": v for c, v in pre_res.c_scores.items()}
    return ProbeReport(pre, rnd, pre_res, rnd_res, classes, extra, pictures)


PROBE_BASELINE_PREFIXES = ("random_init_", "gain_")  # log_probe's baseline metrics; the loop logs none of these
PROBE_CHOICE = "probe_linear_c"  # logged only when the probe chose among several C


def log_probe(tracker, report: ProbeReport) -> None:
    """Probe metrics as ``probe_*``, ``random_init_*`` and ``gain_*`` (the last two only with a baseline),
    the per-class report and the confusion PNG. A baseline an earlier probe logged to the run and this one
    has not (``--no-baseline``) is cleared, so the run never pairs this probe with another's baseline; so
    is an earlier probe's chosen C when this one was given one C."""
    from .. import plots

    metrics = {f"probe_{k}": v for k, v in report.pretrained.items()}
    metrics.update({f"random_init_{k}": v for k, v in report.random_init.items()})
    metrics.update({f"gain_{k}": report.pretrained[k] - report.random_init[k] for k in report.pretrained
                    if k in report.random_init and k != "linear_c"})
    tracker.log_metrics(metrics)
    ours = (k for k in tracker.client.get_run(tracker.run_id).data.metrics
            if k.startswith(PROBE_BASELINE_PREFIXES) or k == PROBE_CHOICE)
    stale = {k for k in ours if not math.isfinite(metrics.get(k, math.nan))}
    if stale:
        tracker.clear_metrics(stale)
    tracker.set_tags({"sslray.probe_converged": report.probe.converged})
    tracker.log_text(report.probe.report, "probe/classification_report.txt")
    fig = plots.confusion(report.probe.confusion, report.classes, "linear probe (pretrained)")
    tracker.log_figure(fig, "probe/confusion_matrix.png")
    plots.close(fig)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sslray-probe-") as d:
        for name, png in report.pictures.items():
            path = Path(d) / name
            path.write_bytes(png)
            tracker.log_artifact(path, "probe")


def format_table(report: ProbeReport) -> str:
    from rich.console import Console
    from rich.table import Table

    def cell(k, v):
        return f"C={v:g}" if k == "linear_c" else f"{100 * v:.2f}%"

    baseline = bool(report.random_init)
    t = Table(title="probe on the val split (frozen backbone)",
              caption=None if baseline else "random-init baseline skipped (--no-baseline)")
    for col in ("metric", "random init", "pretrained", "gain") if baseline else ("metric", "pretrained"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for k, r, p, g in report.table_rows():
        if not baseline:
            t.add_row(k, cell(k, p))
        else:
            t.add_row(k, cell(k, r), cell(k, p), "" if g is None else f"{100 * g:+.2f} pts")
    console = Console(width=100, record=True)
    with console.capture() as cap:
        console.print(t)
    return cap.get()


__all__ = ["probe_checkpoint", "log_probe", "format_table", "load_checkpoint", "read_checkpoint", "find_state",
           "ProbeReport", "random_init_model"]
