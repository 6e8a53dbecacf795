"""The per-worker training loop. Ray is only the outer shell: this runs in one plain process too.

One step: uint8 batch on the device -> per-sample views -> method(views) -> loss -> optimizer
with per-iteration warmup-cosine lr. Each epoch: kNN monitor on the val split, then
``session.report(metrics, state)`` (rank 0 hands over the checkpoint).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Optional

import torch

from ..config import Config, effective_batch, effective_lr, from_dict
from ..datasets.views import build_views, eval_transform
from . import distributed as D
from .accum import Accumulator, coupling_note
from .amp import autocast_for, grad_scaler, resolve_precision
from .data import Data, build_data
from .knn import extract_features, knn_accuracy
from .memory import SSLOutOfMemoryError, auto_batch, explain_oom
from .methods import compile_method, create_method
from .monitors import (COLLAPSE_STATS, TAP_KEYS, EmbeddingTap, NonFiniteLossError, StepHealth, collapse_report,
                       epoch_health)
from .online_probe import OnlineProbe
from .optim import (clip_gradients, load_optimizer_state, optimizer_from_config, set_lr, set_weight_decay,
                    warmup_cosine, weight_decay_at)
from .pictures import RunPictures
from .rng import rank_seed, restore_rng, rng_state, seed_everything

__all__ = ["NonFiniteLossError", "train_loop", "run_local", "train_func"]


def region(name: str):
    """A named torch.profiler range around one part of the step (benchmarks/profile_step.py reports
    ops, host and device time per part); a no-op unless a profiler is recording."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


def knn_monitor(model, data: Data, cfg: Config, session, evalT) -> dict:
    """Features of the bank and val shards on every rank, gathered, then a weighted kNN."""
    dev, prec = session.device, cfg.train.precision
    cl = cfg.train.channels_last and dev.type == "cuda"
    bank_f, bank_y = extract_features(model.backbone, data.bank, evalT, dev, prec, cl)
    val_f, val_y = extract_features(model.backbone, data.val, evalT, dev, prec, cl)
    bank_f, bank_y = D.gather_varlen(bank_f), D.gather_varlen(bank_y)
    val_f, val_y = D.gather_varlen(val_f), D.gather_varlen(val_y)
    return knn_accuracy(val_f, val_y, bank_f, bank_y, data.num_classes, cfg.train.knn_k, cfg.train.knn_temperature)


def compile_warnings(cfg: Config, world_size: int, device_type: str) -> list[str]:
    """What ``model.compile`` cannot do well in this run's setting."""
    out = []
    if cfg.model.compile and cfg.model.sync_bn and world_size > 1 and device_type == "cuda":
        out.append("model.compile with model.sync_bn=true on several GPUs: torch.compile does not trace "
                   "SyncBatchNorm and splits its graph at every one (pytorch/pytorch#161302), so little of the "
                   "backbone is compiled; model.sync_bn=false (per-worker BatchNorm statistics) compiles it whole")
    return out


# Keys added after a checkpoint may have been written, whose new default or recipe value changes how
# its run trains: a checkpoint whose config lacks one resumes with the behaviour it was trained with
# (value before the key existed), so neither its optimizer state nor its weights stop fitting, and its
# steps do not change size midway. Key -> (the method it belongs to, or None for every method; value;
# the config field that came with it). A checkpoint's config lists every field of the config sections,
# so a missing field dates it; ``method.params`` holds only what a recipe or the user set, so a param
# is dated by a field added with it (MAE's recipes leave paper_init to its default: its absence alone
# says nothing).
_V16, _V17 = "optim.lars_eta", "views.mean"  # fields added with the params of each group below
AS_STARTED = {
    "optim.lars_eta": (None, 0.001, _V16), "optim.lars_clip": (None, False, _V16),
    "optim.adam_beta2": (None, 0.95, _V16), "optim.clip_mode": (None, "global", _V16),
    "optim.decay_bias_norm": (None, False, _V16),
    "method.params.paper_init": ("mae", False, _V16), "method.params.freeze_patch_embed": ("mocov3", False, _V16),
    "method.params.norm_last_layer": ("dino", True, _V16),
    "method.params.fixed_pos_embed": ("mocov3", False, _V17), "method.params.scale_loss": ("barlowtwins", 1.0, _V17),
}


_MISSING = object()


def _lookup(saved: dict, key: str):
    node = saved
    for part in key.split("."):
        node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
    return node


def as_started(cfg: Config, saved: Optional[dict], log=print) -> Config:
    """``cfg`` with the ``AS_STARTED`` keys of a checkpoint written before they existed (its config
    ``saved`` lacks the field that came with them) set to the value its run was trained with; said once
    when any is."""
    if not isinstance(saved, dict):
        return cfg
    kept = {key: before for key, (method, before, since) in AS_STARTED.items()
            if (method is None or cfg.method.name == method) and _lookup(saved, since) is _MISSING
            and _lookup(saved, key) is _MISSING}
    if not kept:
        return cfg
    log("sslray: the checkpoint predates " + ", ".join(kept) + ": its run goes on as it was trained ("
        + ", ".join(f"{k}={v}" for k, v in kept.items()) + ")")
    return cfg.replace(**kept)


def train_loop(cfg: Config, session) -> dict:
    """Run ``cfg.train.epochs`` epochs (resuming from the session's latest checkpoint) and return
    the last epoch's metrics. An out-of-memory error comes out as ``SSLOutOfMemoryError``, naming
    the run's shape and the keys that lower the peak; ``data.auto_batch`` first halves the batch
    until a step fits (a resumed run keeps its checkpoint's batch)."""
    dev = session.device
    state = session.restore()
    if state is not None:
        cfg = as_started(cfg, state.get("config"), session.log)
        saved_cfg = state.get("config", {})
        saved = int(saved_cfg.get("data", {}).get("batch_size", cfg.data.batch_size))
        saved_k = int(saved_cfg.get("train", {}).get("accum_steps", 1))
        if (saved, saved_k) != (cfg.data.batch_size, cfg.train.accum_steps) and cfg.data.auto_batch:
            session.log(f"sslray: auto batch: resuming with the checkpoint's global batch {saved} "
                        f"(train.accum_steps={saved_k})")
            cfg = cfg.replace(**{"data.batch_size": saved, "train.accum_steps": saved_k})
    elif cfg.data.auto_batch:
        cfg = auto_batch(cfg, session.world_size, dev, session.log)
    phase = ["setup (model, data, optimizer)"]
    try:
        return _train(cfg, session, state, phase)
    except torch.OutOfMemoryError as e:
        if isinstance(e, SSLOutOfMemoryError):
            raise
        raise explain_oom(cfg, session.world_size, dev, phase[0], e) from e


def _train(cfg: Config, session, state: Optional[dict], phase: list) -> dict:
    dev = session.device
    seed_everything(cfg.train.seed)  # same init on every rank; data_parallel also broadcasts rank 0's weights
    data = build_data(cfg, session)
    views = build_views(cfg.views).to(dev)
    evalT = eval_transform(cfg.views).to(dev)
    model = create_method(cfg)
    if cfg.model.init_weights and state is None:  # a resumed run's checkpoint holds the weights already
        from ..export import init_backbone

        loaded = init_backbone(model, cfg.model.init_weights)
        session.log(f"sslray: {' and '.join(loaded)} start from {cfg.model.init_weights}")
    model = model.to(dev)
    if session.world_size > 1 and cfg.model.sync_bn:
        model = D.convert_global_bn(model, dev.type).to(dev)
    cl = cfg.train.channels_last and dev.type == "cuda"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    if cfg.model.compile:
        compiled = compile_method(model, cfg.model.compile_mode)
        session.log(f"sslray: model.compile: {len(compiled)} module(s) compiled in place ({cfg.model.compile_mode}); "
                    "the first step at each input shape and mode pays the compile")
        for w in compile_warnings(cfg, session.world_size, dev.type):
            session.log(f"sslray: warning: {w}")
    net, sync_grads = D.data_parallel(model, dev)

    peak = effective_lr(cfg)
    opt = optimizer_from_config(model, cfg, peak)
    probe = OnlineProbe.from_config(cfg, model, data.num_classes, evalT, dev)  # own optimizer, detached features
    scaler = grad_scaler(dev, cfg.train.precision)  # loss scaling for fp16; a pass-through otherwise
    total = cfg.train.epochs * data.steps_per_epoch
    warmup = int(round(cfg.optim.warmup_epochs * data.steps_per_epoch))
    acc = Accumulator(cfg.train.accum_steps, cfg.train.online_probe_batch)
    accum = (f" x {acc.k} accumulated micro-batches = {effective_batch(cfg)} per optimizer step" if acc.k > 1 else "")
    session.log(f"sslray: {cfg.method.name} on {cfg.model.backbone}, {session.world_size} worker(s) on {dev.type}, "
                f"global batch {cfg.data.batch_size}{accum}, {data.steps_per_epoch} steps/epoch, precision "
                f"{resolve_precision(cfg.train.precision, dev)}{' with loss scaling' if scaler.is_enabled() else ''}; "
                "effective lr = "
                f"{cfg.optim.base_lr} x {effective_batch(cfg)}/256 ({cfg.optim.lr_scaling}) = {peak:.4g}")
    coupled = coupling_note(model, cfg.method.name, acc.k)
    if coupled:
        session.log(f"sslray: {coupled}")
    # Health: grad norms and non-finite steps on the device (the host looks every check_every steps on
    # GPU, every step on CPU), collapse statistics of the epoch's last step, pictures on rank 0.
    health = StepHealth(model, dev, cfg.monitor.max_nonfinite_skips,
                        cfg.monitor.check_every if dev.type == "cuda" else 1, loss_scaling=scaler.is_enabled())
    # The tap also feeds the online probe the first view's backbone features (no extra forward).
    tap = EmbeddingTap(model) if cfg.monitor.collapse or probe is not None else None
    probe_tap = probe is not None and tap.from_head
    pictures = RunPictures(cfg, session, model, data, views, evalT)

    start_epoch, start_batch, step, last, partial = 0, 0, 0, {}, None
    if state is not None:
        model.load_state_dict(state["model"])
        load_optimizer_state(opt, state["optimizer"])  # moments from the checkpoint, settings from this config
        start_epoch, step, last = int(state["epoch"]), int(state["step"]), state.get("metrics", {})
        start_batch, partial = int(state.get("batch_in_epoch", 0)), state.get("partial")
        saved_spe = int(state.get("steps_per_epoch", data.steps_per_epoch))
        if saved_spe != data.steps_per_epoch:
            # Another batch size (an OOM's advice), subset or step cap: the counters are rescaled to this
            # run's steps per epoch, so the lr, weight-decay and momentum schedules go on from the same point.
            ratio = data.steps_per_epoch / saved_spe
            start_batch = min(int(round(start_batch * ratio)), data.steps_per_epoch - 1)
            rebased = start_epoch * data.steps_per_epoch + start_batch
            session.log(f"sslray: the checkpoint was trained at {saved_spe} steps per epoch, this run has "
                        f"{data.steps_per_epoch} (global batch {cfg.data.batch_size}): global step {step} -> "
                        f"{rebased}, the same point of the schedules")
            step = rebased
        saved_k = int(state.get("config", {}).get("train", {}).get("accum_steps", 1))
        if saved_k != acc.k:
            # Allowed, as a change of batch is: the step counter is rescaled above when the steps per
            # epoch changed, and half the batch at twice the accumulation keeps the run's effective batch.
            saved_bs = int(state.get("config", {}).get("data", {}).get("batch_size", cfg.data.batch_size))
            session.log(f"sslray: note: the checkpoint was trained with train.accum_steps={saved_k} (effective batch "
                        f"{saved_bs * saved_k}), this run uses {acc.k} (effective batch {effective_batch(cfg)})")
        restore_rng(state, session.rank, cfg.train.seed, session.device)
        if probe is not None and state.get("online_probe"):
            probe.load_state_dict(state["online_probe"])
        if scaler.is_enabled() and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        session.log(f"sslray: resumed at epoch {start_epoch + 1}, batch {start_batch} (global step {step})")
    elif session.world_size > 1:
        # The model was built from one shared seed; from here each rank draws its own views, masks and
        # crops. With one stream on every rank, image i of each worker's shard got the same crop,
        # jitter and MAE mask, so a global batch held batch/workers independent draws.
        seed_everything(rank_seed(cfg.train.seed, session.rank))

    def snapshot(epoch_index: int, batch_in_epoch: int, metrics: dict, part: Optional[dict]) -> Optional[dict]:
        """Everything needed to continue exactly here: model (EMA teachers, queues and prototypes are
        its buffers), optimizer, counters, RNG streams, and the loader epoch (its order is seed + epoch)."""
        # Collectives, so every rank calls snapshot: each rank's RNG streams, the probe's all-rank sums.
        rng_ranks = D.gather_objects(rng_state(session.device)) if session.world_size > 1 else None
        probe_sums = probe.global_sums() if probe is not None else None
        if session.rank != 0:
            return None
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch_index,
                "batch_in_epoch": batch_in_epoch, "step": step, "steps_per_epoch": data.steps_per_epoch,
                "rng": rng_state(session.device), "rng_ranks": rng_ranks,
                "partial": part,
                "loader_seed": cfg.train.seed, "config": cfg.to_dict(), "metrics": metrics,
                "num_classes": data.num_classes,
                "online_probe": probe.state_dict(probe_sums) if probe is not None else None,
                "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None}

    tc = cfg.train
    for epoch in range(start_epoch, tc.epochs):
        net.train()
        phase[0] = "training step"
        data.train.next_epoch = epoch  # FFCV draws this epoch's order from seed + epoch
        skip = start_batch if epoch == start_epoch else 0
        resumed = partial if skip and partial else {"loss_sum": 0.0, "n": 0, "seconds": 0.0}
        # The saved sum spans the saving run's ranks; the epoch mean divides by this run's: rank 0 carries
        # it on, rescaled when the number of workers changed (its rank mean counts once either way).
        carried = float(resumed["loss_sum"]) * session.world_size / float(resumed.get("world_size", session.world_size))
        loss_sum = torch.tensor(carried if session.rank == 0 else 0.0, device=dev)
        n_steps, prior_seconds = int(resumed["n"]), float(resumed["seconds"])
        prior_ok = float(resumed.get("n_ok", resumed["n"]))
        health.reset_epoch()
        if skip:
            health.resume_epoch(resumed.get("health"))
        t0 = t_wait = time.perf_counter()
        wait_s = 0.0
        n_batches = data.steps_per_epoch * acc.k  # loader batches trained on; a last partial window is not
        for i, (x, y) in enumerate(data.train):
            wait_s += time.perf_counter() - t_wait  # host time blocked on the loader's next batch
            if i >= n_batches:
                break
            if i < skip * acc.k:  # already trained before the checkpoint; same order, so skip it
                t_wait = time.perf_counter()
                continue
            if acc.first(i):  # one optimizer step starts: its schedules, its buffers kept for a skip
                lr = warmup_cosine(step, total, warmup, peak, peak * cfg.optim.min_lr_ratio)
                set_lr(opt, lr)
                if cfg.optim.weight_decay_end >= 0:
                    set_weight_decay(opt, weight_decay_at(step, total, cfg.optim.weight_decay,
                                                          cfg.optim.weight_decay_end))
                health.before_forward()  # with skips allowed: the buffers this step's forwards write, kept
            with region("sslray.views"):
                v = views(x)
                if cl:
                    v = [t.contiguous(memory_format=torch.channels_last) for t in v]
            if tap is not None:
                tap.captured = {}
                # collapse statistics of the epoch's last step; the probe's features every step
                tap.armed = probe_tap or (cfg.monitor.collapse and i + 1 == n_batches)
            with acc.sync_context(net, i):  # gradients are all-reduced once, after the window's last backward
                with region("sslray.forward"), autocast_for(dev, tc.precision):
                    out = net(v)
                if tap is not None:
                    tap.armed = False
                if step == 0 and state is None and acc.first(i):
                    pictures.at_start(x, v, total, warmup, peak)
                with region("sslray.backward"):
                    acc.backward(out["loss"], scaler, i, opt)
            if probe is not None:
                f = tap.captured.get("feats") if probe_tap else None
                # views are batched view-major: rows 0..B-1 = view 1
                acc.keep_probe(f[: y.shape[0]] if f is not None and f.ndim == 2 and f.shape[0] >= y.shape[0]
                               else None, x, y)
            if not acc.last(i):
                t_wait = time.perf_counter()
                continue
            loss = acc.step_loss()
            with region("sslray.backward"):
                sync_grads()
                scaler.unscale_(opt)  # health and clipping see the true gradients
            with region("sslray.health"):
                ok = health.after_backward(loss, step, lr)  # device flag: no host sync here
                if health.due(step):
                    health.check(cfg.method.name, epoch + 1)
            with region("sslray.optimizer"):
                if cfg.optim.clip_grad > 0:
                    clip_gradients(list(model.parameters()), cfg.optim.clip_grad, cfg.optim.clip_mode)
                scaler.step(opt)  # fp16: skipped when the gradients overflowed at this scale
                scaler.update()
                health.restore(ok)
            with region("sslray.on_step"):
                if hasattr(model, "on_step"):
                    model.on_step(step, total)
            if probe is not None:
                with region("sslray.online_probe"):
                    f, px, py = acc.probe_batch()
                    if f is not None:
                        probe.step_features(f, py, ok)
                    else:
                        probe.step(model.backbone, px, py, ok)
            loss_sum += torch.where(ok, loss.float(), 0.0)
            n_steps += 1
            step += 1
            j = (i + 1) // acc.k  # optimizer steps of this epoch done
            if tc.log_every and j % tc.log_every == 0:
                el = time.perf_counter() - t0
                session.log(f"epoch {epoch + 1}/{tc.epochs} step {j}/{data.steps_per_epoch} "
                            f"loss {loss.item():.4f} lr {lr:.4g} {(j - skip) * effective_batch(cfg) / el:.0f} img/s")
            ckpt_now = tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0
            report_now = tc.report_every_steps and step % tc.report_every_steps == 0
            if j < data.steps_per_epoch and (ckpt_now or report_now):
                health.check(cfg.method.name, epoch + 1)  # never checkpoint past a bad step
                # batch_in_epoch counts optimizer steps: a resume skips that many whole windows
                m = {"epoch": epoch, "step": step, "step_loss": float(D.all_reduce_mean(loss)), "partial": 1,
                     "batch_in_epoch": j, "steps_per_epoch": data.steps_per_epoch}
                # The loss sum of every rank (rank 0 carries it on after a resume, the others restart at 0).
                part = {"loss_sum": float(D.all_reduce_mean(loss_sum)) * session.world_size, "n": n_steps,
                        "n_ok": prior_ok + float(health.ok_steps), "seconds": prior_seconds + time.perf_counter() - t0,
                        "health": health.epoch_state(), "world_size": session.world_size}
                session.report(m, snapshot(epoch, j, last, part) if ckpt_now else None)
            t_wait = time.perf_counter()
        health.check(cfg.method.name, epoch + 1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        mean_loss = float(D.all_reduce_mean(loss_sum / (health.ok_steps + prior_ok).clamp_min(1)))
        metrics = {
            "epoch": epoch + 1,
            "step": step,
            "loss": mean_loss,
            "lr": lr,
            "epoch_seconds": prior_seconds + seconds,
            "images_per_sec": (n_steps - int(resumed["n"])) * effective_batch(cfg) / max(seconds, 1e-9),
        }
        metrics.update(epoch_health(health, tap if cfg.monitor.collapse else None, n_steps - int(resumed["n"]), wait_s,
                                    metrics["images_per_sec"], session.world_size, epoch_steps=n_steps))
        flags, warnings = collapse_report(metrics)
        metrics.update(flags)
        for w in warnings:
            session.log(f"epoch {epoch + 1}: {w}")
        if metrics["nonfinite_skipped_frac"] > 0:
            session.log(f"epoch {epoch + 1}: {metrics['nonfinite_skipped_frac']:.1%} of steps skipped "
                        "(non-finite loss or gradient)")
        if data.val is not None and ((epoch + 1) % tc.knn_every == 0 or epoch + 1 == tc.epochs):
            t1 = time.perf_counter()
            phase[0] = "kNN monitor (feature extraction)"
            metrics.update(knn_monitor(model, data, cfg, session, evalT))
            metrics["knn_seconds"] = time.perf_counter() - t1
        if probe is not None:
            phase[0] = "online probe evaluation"
            metrics.update(probe.epoch_metrics(model.backbone, data.val))
        if cfg.data.auto_batch:  # what it settled on; with auto_batch_accum the accumulation it raised to keep it
            metrics["global_batch"] = cfg.data.batch_size
            metrics["accum_steps"] = cfg.train.accum_steps
        if scaler.is_enabled():
            metrics["amp_scale"] = float(scaler.get_scale())
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(f"{cfg.method.name}: non-finite mean loss in epoch {epoch + 1}")
        pictures.after_epoch(epoch + 1, epoch + 1 == tc.epochs)
        session.log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        keep = (epoch + 1) % max(1, tc.checkpoint_every) == 0 or epoch + 1 == tc.epochs
        session.report(metrics, snapshot(epoch + 1, 0, metrics, None) if keep else None)
        last = metrics
    return last


# Every per-epoch metric the loop can report (which appear depends on the config: kNN and online-probe
# val scores need a val split, amp_* fp16, global_batch and accum_steps data.auto_batch). `sslray tune --metric` is
# checked against it before any trial starts; tests/test_all_methods_ray.py checks every method's real
# reports against it, so a new metric cannot be left out.
EPOCH_METRICS = frozenset({
    "epoch", "step", "loss", "lr", "epoch_seconds", "images_per_sec", "images_per_sec_per_worker",
    "data_wait_ms_per_step", "grad_norm_backbone", "grad_norm_heads", "nonfinite_skipped_frac",
    "amp_overflow_frac", "amp_scale", "global_batch", "accum_steps", "knn_top1", "knn_top5", "knn_seconds",
    "online_probe_top1", "online_probe_top5", "online_probe_train_top1", "online_probe_train_loss",
    *(f"{k}_{s}" for k in TAP_KEYS for s in COLLAPSE_STATS), *(f"collapse_{k}" for k in TAP_KEYS)})
VAL_METRICS = ("knn_top1", "knn_top5", "online_probe_top1", "online_probe_top5")  # measured on the val split


def checkpoint_name(metrics: dict) -> str:
    """``epoch_0003`` after 3 epochs; ``epoch_0003.250000_step_0000412`` a quarter into the 4th.

    Names sort in training order, which is how the newest is found (``LocalSession.restore``, the
    probe/eval/export readers). Inside an epoch the order key is the fraction of the epoch done, not
    the global step: a resume at another batch size renumbers the steps (same point of the schedules,
    other count), so a step-keyed name of the crashed run could sort after the resumed run's newer ones.
    """
    name = f"epoch_{int(metrics['epoch']):04d}"
    if not metrics.get("partial"):
        return name
    done = int(metrics["batch_in_epoch"]) * 10**6 // max(1, int(metrics["steps_per_epoch"]))
    return f"{name}.{done:06d}_step_{int(metrics['step']):07d}"


def train_func(config: dict) -> None:
    """Ray Train entry point: ``train_loop_config={"cfg": Config.to_dict()}``."""
    from .session import RaySession

    cfg = from_dict(config["cfg"])
    train_loop(cfg, RaySession(cfg.ray.use_gpu, config.get("pictures_dir")))


def run_local(cfg: Config, ckpt_dir: Optional[str] = None, keep: int = 0):
    """Same loop, one process, no Ray (bare GPU machines, tests, benchmarks); ``keep`` > 0 keeps only
    that many newest checkpoints (``sslray.train_local`` passes ``ray.num_to_keep``)."""
    from .session import LocalSession

    session = LocalSession(ckpt_dir, cfg.ray.use_gpu, keep=keep)
    last = train_loop(cfg, session)
    return last, session
