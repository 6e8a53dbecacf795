"""Device memory: an out-of-memory error that says what to change, and a batch size that fits.

``explain_oom`` turns torch's ``OutOfMemoryError`` (a bare allocator message, often surfacing
through Ray as a worker traceback) into one that names the run's method, backbone, per-worker and
global batch, image size and precision, the device's memory, and the config keys that lower the
peak. ``fit_batch`` (``data.auto_batch=true``) tries one real training step (views, forward,
backward, optimizer step) on a throw-away copy of the model at the configured batch and halves the
per-worker batch until the step fits on every worker; the global batch, and with it the lr
(``optim.lr_scaling``), follows, unless ``data.auto_batch_accum`` raises ``train.accum_steps`` by the
same factor, which keeps the effective batch, the lr and the schedule.
"""

from __future__ import annotations

import gc
from typing import Callable, Optional

import torch

from ..config import Config, effective_batch, effective_lr
from . import distributed as D
from .amp import autocast_for, grad_scaler, resolve_precision

MIN_PER_WORKER = 2  # BatchNorm and the contrastive losses need at least two images per worker


class SSLOutOfMemoryError(torch.OutOfMemoryError):
    """torch's OutOfMemoryError with the run's shape and what to change (still an OutOfMemoryError,
    so callers that catch torch's class keep working)."""


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def device_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "device: CPU"
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    return (f"device: {torch.cuda.get_device_name(device)}, {_gib(total)} total, {_gib(free)} free, "
            f"peak allocated {_gib(peak)}")


def explain_oom(cfg: Config, world: int, device: torch.device, phase: str,
                exc: BaseException) -> SSLOutOfMemoryError:
    """An OutOfMemoryError whose message says where it happened and which keys lower the peak."""
    per = cfg.data.batch_size // max(1, world)
    tips = [f"--batch-size {max(world, cfg.data.batch_size // 2)} (or data.batch_size=...): half the global batch; "
            f"the lr follows by optim.lr_scaling={cfg.optim.lr_scaling}",
            f"data.batch_size={max(world, cfg.data.batch_size // 2)} train.accum_steps={2 * cfg.train.accum_steps}: "
            "the same effective batch, lr and schedule in two micro-batches per step (batch-coupled terms, "
            "such as negatives and BatchNorm statistics, see one micro-batch)",
            "data.auto_batch=true: halve the batch before training until a step fits",
            "model.grad_checkpointing=true: recompute backbone activations in backward (~30% slower, far less memory)"]
    prec = resolve_precision(cfg.train.precision, device)
    if device.type == "cuda" and prec == "fp32":
        tips.append("train.precision=auto: half-size activations (bf16, or fp16 with loss scaling on GPUs before "
                    "compute capability 8.0)")
    if cfg.views.preset in ("dino", "swav") or cfg.views.local_crops > 0:
        tips.append("views.local_crops=N with a smaller N: every local crop is another forward")
    tips.append(f"--workers {2 * world}: the same global batch with half as many images per device")
    return SSLOutOfMemoryError(
        f"out of memory in the {phase}: method {cfg.method.name}, backbone {cfg.model.backbone}, "
        f"{per} images per worker (global batch {cfg.data.batch_size} over {world} worker(s)) at "
        f"{cfg.views.crop_size} px, precision {prec}; {device_memory(device)}.\n"
        "To fit, any of:\n  - " + "\n  - ".join(tips)
        + f"\n(torch: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def try_step(cfg: Config, per_worker: int, device: torch.device) -> bool:
    """One training step of a fresh copy of the run's model on a random uint8 batch of
    ``per_worker`` images: True when it fits, False on OutOfMemoryError (memory freed again).

    The step talks to no other worker (gathers are local copies of the global batch's shape): a
    worker that runs out of memory must not leave the others waiting in a collective it never
    reaches. The workers agree on the outcome afterwards (``all_workers_ok``)."""
    from ..datasets.views import build_views
    from .methods import create_method
    from .optim import optimizer_from_config

    model = views = opt = out = None
    try:
        with D.local_collectives():
            model = create_method(cfg).to(device)
            if cfg.train.channels_last and device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            views = build_views(cfg.views).to(device)
            opt = optimizer_from_config(model, cfg, effective_lr(cfg))
            res = cfg.data.decode_res or cfg.views.crop_size
            x = torch.randint(0, 256, (per_worker, 3, res, res), dtype=torch.uint8, device=device)
            scaler = grad_scaler(device, cfg.train.precision)
            with autocast_for(device, cfg.train.precision):
                out = model(views(x))
            scaler.scale(out["loss"]).backward()
            scaler.step(opt)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del model, views, opt, out
        _free(device)


def fit_batch(per_worker: int, world: int, attempt: Callable[[int], bool],
              agree: Callable[[bool], bool] = lambda ok: ok, log: Optional[Callable[[str], None]] = None) -> int:
    """The largest ``per_worker / 2**k`` (k >= 0, at least MIN_PER_WORKER) for which ``attempt``
    succeeds on every worker (``agree`` combines the workers' answers); raises when none does."""
    b = per_worker
    while b >= MIN_PER_WORKER:
        if agree(attempt(b)):
            return b
        if log:
            nxt = f"trying {b // 2}" if b // 2 >= MIN_PER_WORKER else "nothing smaller to try"
            log(f"sslray: auto batch: {b} images per worker (global {b * world}) does not fit; {nxt}")
        b //= 2
    raise torch.OutOfMemoryError(f"auto batch: not even {MIN_PER_WORKER} images per worker fit in device memory")


def all_workers_ok(ok: bool, device: torch.device) -> bool:
    """True only when every worker's step fit (a 0/1 all-reduce; no-op with one process)."""
    flag = torch.tensor(1.0 if ok else 0.0, device=device)
    return bool(float(D.all_reduce_mean(flag)) > 0.999)


def accum_split(per: int, fitted: int) -> tuple[int, int]:
    """``(micro, k)``: ``per`` images per worker as ``k`` micro-batches of ``micro`` <= ``fitted`` (the
    largest that fit), ``micro * k == per`` when any such split has ``micro >= MIN_PER_WORKER`` (100 at
    12: 10 x 10, not 12 x 8 = 96), else ``fitted`` x ``per // fitted`` (a smaller effective batch)."""
    for k in range(-(-per // fitted), per // MIN_PER_WORKER + 1):
        if per % k == 0:
            return per // k, k
    return fitted, per // fitted


def auto_batch(cfg: Config, world: int, device: torch.device, log: Callable[[str], None]) -> Config:
    """``cfg`` with the largest global batch (configured / 2**k) whose step fits on every worker."""
    per = cfg.data.batch_size // world
    fitted = fit_batch(per, world, lambda b: try_step(cfg.replace(**{"data.batch_size": b * world}), b, device),
                       lambda ok: all_workers_ok(ok, device), log)
    if device.type == "cuda":  # the run's peak memory (a study's peak_gpu_mem_mb) is training's, not the trials'
        torch.cuda.reset_peak_memory_stats(device)
    if fitted != per and cfg.data.auto_batch_accum:
        micro, split = accum_split(per, fitted)
        k = cfg.train.accum_steps * split
        new = cfg.replace(**{"data.batch_size": micro * world, "train.accum_steps": k})
        kept = (f"effective batch {effective_batch(new)} and lr {effective_lr(new):.4g} kept"
                if effective_batch(new) == effective_batch(cfg) else
                f"effective batch {effective_batch(cfg)} -> {effective_batch(new)} (no split of {per} per worker "
                f"into micro-batches of {MIN_PER_WORKER}..{fitted}), "
                f"lr {effective_lr(cfg):.4g} -> {effective_lr(new):.4g}")
        log(f"sslray: auto batch: global batch {cfg.data.batch_size} -> {new.data.batch_size} "
            f"({micro} per worker) with train.accum_steps {cfg.train.accum_steps} -> {k} (data.auto_batch_accum): "
            f"{kept}")
        return new
    if fitted != per:
        new = cfg.replace(**{"data.batch_size": fitted * world})
        log(f"sslray: auto batch: global batch {cfg.data.batch_size} -> {new.data.batch_size} "
            f"({fitted} per worker); lr {effective_lr(cfg):.4g} -> {effective_lr(new):.4g} "
            f"({cfg.optim.lr_scaling} scaling)")
        return new
    log(f"sslray: auto batch: the configured global batch {cfg.data.batch_size} fits")
    return cfg


__all__ = ["SSLOutOfMemoryError", "accum_split", "auto_batch", "explain_oom", "fit_batch", "try_step", "MIN_PER_WORKER"]
