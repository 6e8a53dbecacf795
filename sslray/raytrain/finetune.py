"""Supervised fine-tuning of a whole pretrained backbone on Ray Train workers, beside the same budget
from a random init.

Each worker: the checkpoint's backbone (or the seeded random init every probe uses) + a linear head,
AdamW with per-step warmup-cosine lr, layer-wise lr decay on ViTs (BEiT / MAE fine-tuning: block i
of L gets ``decay ** (L + 1 - (i + 1))`` of the lr, the patch embedding ``decay ** (L + 1)``, the head
1), labels with smoothing, and one augmented view per image from a view preset
(``sslray.datasets.views.PRESETS``, cut on the device with per-sample parameters). Gradients are
averaged the way the pretraining loop does it (``distributed.data_parallel``). The val split is
scored in disjoint per-rank slices, gathered, then top-1, top-5 and macro F1 (scikit-learn).

The same loop is the ``linear_sgd`` protocol with ``freeze_backbone``: the backbone gets no gradient
and stays in eval mode (its BatchNorm statistics never move), and only the head trains, with SGD
(``linear_sgd_settings``: momentum 0.9, no weight decay, cosine lr, no label smoothing).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .amp import autocast_for, grad_scaler
from .classifier import OPTIMIZERS, Classifier, is_vit, layer_decay_groups, make_optimizer, vit_layer_id, with_drop_path


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int = 10  # passes over the (sub)set of train images
    max_steps: int = 0  # cap on optimizer steps in all (smoke tests); 0 = epochs x steps per epoch
    batch_size: int = 256  # global batch over all workers, images per step
    base_lr: float = 1e-3  # optimizer lr per 256 images (effective lr = base_lr * batch / 256)
    weight_decay: float = 0.05  # on weights only (biases, norms and tokens get none); AdamW's is decoupled
    layer_decay: float = 0.75  # ViT layer-wise lr decay; 1.0 turns it off; non-ViT backbones ignore it
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    drop_path: float = 0.0  # stochastic depth (timm's drop_path_rate), on the pretrained and random init alike
    optimizer: str = "adamw"  # "adamw" (betas 0.9, 0.999) or "sgd" (momentum 0.9)
    freeze_backbone: bool = False  # train the head alone; the backbone stays in eval mode (linear_sgd)
    views: str = "mae"  # view preset for the train images (MAE's: random-resized crop + flip)
    min_scale: float = 0.2  # the preset's crop scale lower bound
    num_workers: int = 2  # Ray Train workers
    cpus_per_worker: float = 1.0
    use_gpu: str = "auto"
    train_subset: int = 0  # seeded random subset of the train split (0 = all)
    val_subset: int = 0
    seed: Optional[int] = None  # None: the checkpoint's train.seed (the other protocols draw their subsets with it)
    storage: str = ""  # Ray's run folder; empty = a temporary folder (nothing is checkpointed)
    save: str = ""  # folder for the pretrained fit's classifier (sslray.raytrain.finetuned); empty = not kept

    @property
    def protocol(self) -> str:
        """The eval protocol these settings run, which names its metrics and log lines."""
        return "linear_sgd" if self.freeze_backbone else "finetune"


def linear_sgd_settings(base: FinetuneSettings, epochs: int = 100, base_lr: float = 0.1, max_steps: int = 0,
                        batch_size: int = 256) -> FinetuneSettings:
    """The linear evaluation protocol (MoCo v3, MAE linear probing) on ``base``'s workers, device and
    subsets: a frozen backbone, SGD with momentum 0.9 at ``base_lr`` per 256 images, cosine to 0 with
    no warmup, no weight decay or label smoothing, random-resized crops (scale 0.08-1) and flips."""
    return dataclasses.replace(base, epochs=epochs, max_steps=max_steps, batch_size=batch_size, base_lr=base_lr,
                               weight_decay=0.0, layer_decay=1.0, warmup_epochs=0.0, label_smoothing=0.0,
                               drop_path=0.0, optimizer="sgd", freeze_backbone=True, views="mae", min_scale=0.08,
                               save="")


def classification_metrics(logits: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
    from sklearn.metrics import accuracy_score, top_k_accuracy_score

    from .knn import top5_k
    from .probe import macro_scores

    labels = np.arange(num_classes)
    pred = logits.argmax(1)
    k = top5_k(num_classes)
    return {"top1": float(accuracy_score(y, pred)),
            "top5": float(top_k_accuracy_score(y, logits, k=k, labels=labels)) if k > 1 else
            float(accuracy_score(y, pred)),
            "macro_f1": macro_scores(y, pred)["macro_f1"]}


def finetune_view(cfg, s: "FinetuneSettings"):
    """The training view: the ``s.views`` preset's first, normalised as the checkpoint's run was
    (``views.mean`` / ``views.std``) so that training and the validation transform agree. The run's
    ``views.aug`` stays with pretraining: it overrides ops of the pretraining preset."""
    from ..datasets.views import PRESETS, normalisation

    params = PRESETS.get(s.views)(size=cfg.views.crop_size, min_scale=s.min_scale)[0][0]
    mean, std = normalisation(cfg.views)
    return dataclasses.replace(params, mean=tuple(mean), std=tuple(std))


def finetune_loop(c: dict, session) -> dict:
    """One worker's fine-tuning run; ``c`` holds plain values (it crosses the Ray boundary)."""
    from ..datasets.loader import check_same_classes, dataset_info, eval_slice, make_loader, subset_indices
    from ..datasets.views import BACKENDS, eval_transform
    from .evaluate import load_checkpoint, random_init_model
    from .finetuned import save_classifier
    from .rng import rank_seed, seed_everything
    from .optim import warmup_cosine

    s = FinetuneSettings(**c["settings"])
    name = s.protocol
    dev, world = session.device, session.world_size
    cfg, model, state = load_checkpoint(c["state_path"], torch.device("cpu"))
    if c["init"] == "random_init":
        model = random_init_model(cfg)
    backbone = with_drop_path(model.backbone, cfg, s.drop_path)  # before the seed: the head init stays the same
    if s.seed is None:
        s = dataclasses.replace(s, seed=cfg.train.seed)
    seed_everything(s.seed)  # the head and the data order are the same for both inits
    info, val_info = dataset_info(c["train"]), dataset_info(c["val"])
    classes = check_same_classes(info, val_info)
    net = Classifier(backbone, int(backbone.num_features), len(classes), s.freeze_backbone)
    if world > 1 and not s.freeze_backbone:  # a frozen backbone's BatchNorm uses its running statistics
        net = D.convert_global_bn(net, dev.type)
    net = net.to(dev)
    ddp, sync_grads = D.data_parallel(net, dev)
    if world > 1:  # one head for all ranks (above); from here each rank draws its own augmentations
        seed_everything(rank_seed(s.seed, session.rank))
    if s.batch_size % world:
        raise ValueError(f"finetune batch_size {s.batch_size} must divide evenly over {world} workers")
    per = s.batch_size // world
    tr_idx = subset_indices(info.num_images, s.train_subset, s.seed)
    n_train = info.num_images if tr_idx is None else len(tr_idx)
    if n_train // world < per:
        raise ValueError(f"finetune batch_size {s.batch_size} is larger than the {n_train} train images allow")
    common = dict(res=cfg.data.decode_res, device=dev, num_workers=cfg.data.loader_workers)
    train = make_loader(c["train"], per, train=True, seed=s.seed, indices=tr_idx, distributed=world > 1, **common)
    n_val = val_info.num_images
    va_idx = eval_slice(subset_indices(n_val, s.val_subset, s.seed), n_val, session.rank, world)
    val = make_loader(c["val"], max(per, 256), train=False, indices=va_idx, **common)
    aug = BACKENDS.get(getattr(cfg.views, "backend", "fused"))(finetune_view(cfg, s)).to(dev)
    evalT = eval_transform(cfg.views).to(dev)

    steps_per_epoch = len(train)
    total = s.epochs * steps_per_epoch if not s.max_steps else min(s.max_steps, s.epochs * steps_per_epoch)
    epochs = -(-total // steps_per_epoch)
    peak = s.base_lr * s.batch_size / 256
    warm = int(round(s.warmup_epochs * steps_per_epoch))
    opt = make_optimizer(net, s, peak)
    scaler = grad_scaler(dev, cfg.train.precision)  # fp16: loss scaling (an overflowing step is skipped)
    session.log(f"{name} ({c['init']}): {cfg.model.backbone}{' (frozen)' if s.freeze_backbone else ''}, {world} "
                f"worker(s) on {dev.type}, global batch {s.batch_size}, {total} steps; {s.optimizer} effective lr = "
                f"{s.base_lr} x {s.batch_size}/256 = {peak:.4g}, weight decay {s.weight_decay}, label smoothing "
                f"{s.label_smoothing}, drop path {s.drop_path}, layer decay "
                f"{s.layer_decay if is_vit(net.backbone) else 'off (not a ViT)'}")
    step, t0, last = 0, time.perf_counter(), {}
    for epoch in range(epochs):
        ddp.train()
        train.next_epoch = epoch
        loss_sum, n = torch.zeros((), device=dev), 0
        for x, y in train:
            if step >= total:
                break
            lr = warmup_cosine(step, total, warm, peak)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            with autocast_for(dev, cfg.train.precision):
                logits = ddp(aug(x))
            loss = F.cross_entropy(logits.float(), y.long().view(-1), label_smoothing=s.label_smoothing)
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"{name} ({c['init']}): non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            sync_grads()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach()
            n += 1
            step += 1
        last = {"epoch": epoch + 1, "step": step, "train_loss": float(D.all_reduce_mean(loss_sum / max(1, n))),
                **evaluate_logits(net, val, evalT, dev, cfg.train.precision, len(classes)),
                "seconds": time.perf_counter() - t0}
        session.log(f"{name} ({c['init']}): epoch {epoch + 1}/{epochs} step {step}/{total} "
                    f"train loss {last['train_loss']:.4f} val top-1 {last['top1']:.4f} ({last['seconds']:.0f} s)")
        final = epoch + 1 == epochs
        keep = final and c.get("save") and session.rank == 0  # the trained classifier, written where session says
        session.report(last, final=final, save=(lambda folder: save_classifier(
            net, cfg, classes, folder, checkpoint=c["state_path"], state=state,
            info={"settings": asdict(s), **last})) if keep else None)
    return last


@torch.no_grad()
def evaluate_logits(net: nn.Module, loader, evalT, dev, precision: str, num_classes: int) -> dict:
    was = net.training
    net.eval()
    outs, ys = [], []
    for x, y in loader:
        with autocast_for(dev, precision):
            outs.append(net(evalT(x)).float())
        ys.append(y.to(dev).long().view(-1).clone())  # FFCV reuses its buffers
    net.train(was)
    logits = D.gather_varlen(torch.cat(outs)).cpu().numpy()
    y = D.gather_varlen(torch.cat(ys)).cpu().numpy()
    return {**classification_metrics(logits, y, num_classes), "val_images": int(len(y))}


class _Reporter:
    """Ray Train session for ``finetune_loop``: rank/device from RaySession, metrics via ray.train.report."""

    def __init__(self, use_gpu: str):
        from .session import RaySession

        self._s = RaySession(use_gpu)
        self.rank, self.world_size, self.device = self._s.rank, self._s.world_size, self._s.device

    def report(self, metrics: dict, final: bool = False, save: Optional[Callable[[Path], object]] = None) -> None:
        """Ray Train V2 keeps a run's metrics with its checkpoints, so the last report carries a tiny one
        (``metrics.json``, rank 0) and ``Result.metrics`` returns the final scores to the driver. ``save``
        writes the classifier into the checkpoint's ``SAVED`` folder, where the driver copies it from
        (rank 0 may run on another node than the driver)."""
        import json

        import ray.train

        if not final or self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="sslray-finetune-") as d:
            Path(d, "metrics.json").write_text(json.dumps(metrics))
            if save is not None:
                save(Path(d, SAVED))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def log(self, msg: str) -> None:
        self._s.log(msg)


SAVED = "classifier"  # the final checkpoint's folder holding the --ft-save files


def finetune_func(config: dict) -> None:
    """Ray Train entry point."""
    finetune_loop(config, _Reporter(config["settings"]["use_gpu"]))


def saved_plugins(state_path: str) -> tuple[str, ...]:
    """The ``method.plugins`` a checkpoint's config names, read with its tensors left on disk (mmap)."""
    state = torch.load(state_path, map_location="cpu", weights_only=False, mmap=True)
    plugins = ((state.get("config") or {}).get("method") or {}).get("plugins") or ()
    return tuple(plugins)


def run_finetune(state_path: str, train: str, val: str, init: str, s: FinetuneSettings) -> dict:
    """One TorchTrainer fit; returns the last epoch's metrics (rank 0)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .finetuned import check_save_dir, keep_saved
    from .methods import import_plugins
    from .trainer import ensure_ray, worker_runtime_env

    save = bool(s.save) and init == "pretrained"  # --ft-save keeps the pretrained fit only
    if save:
        check_save_dir(s.save)  # before the fit, not after it
    ensure_ray()
    # A plugin method's checkpoint: its modules imported here first (a missing one named by key), their
    # folders on the workers' path, as a pretraining run's.
    plugins = saved_plugins(state_path)
    import_plugins(plugins)
    renv = worker_runtime_env(plugins)
    mode = str(s.use_gpu).lower()
    use_gpu = mode in ("true", "1", "yes") or (mode == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
    storage = s.storage or tempfile.mkdtemp(prefix="sslray-finetune-")
    trainer = TorchTrainer(
        finetune_func,
        train_loop_config={"state_path": str(state_path), "train": train, "val": val, "init": init,
                           "settings": asdict(s), "save": save},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=RunConfig(name=f"finetune-{init}-{time.strftime('%Y%m%d-%H%M%S')}",
                             storage_path=str(Path(storage).resolve()),
                             **({"worker_runtime_env": renv} if renv else {})),
    )
    result = trainer.fit()  # a failed fit keeps its folder: Ray's error and worker logs are there
    metrics = dict(result.metrics or {})
    if "top1" not in metrics:
        raise RuntimeError(f"{s.protocol} ({init}): the Ray Train run in {storage} reported no final scores")
    if save:  # out of the final checkpoint, before a temporary storage folder goes
        with result.checkpoint.as_directory() as d:
            keep_saved(Path(d, SAVED), s.save)
    if not s.storage:  # a folder made for this fit: its checkpoints are not kept
        shutil.rmtree(storage, ignore_errors=True)
    return metrics


def scores(m: dict, s: FinetuneSettings) -> dict[str, float]:
    """A fit's metrics under its protocol's names (``finetune_top1``, ``linear_sgd_top1``, ...)."""
    return {f"{s.protocol}_{k}": float(m[k]) for k in ("top1", "top5", "macro_f1")}


def run_info(m: dict) -> dict:
    return {k: m.get(k) for k in ("epoch", "step", "train_loss", "seconds", "val_images")}


def finetune_compare(state_path: str, train: str, val: str, s: FinetuneSettings,
                     log: Callable[[str], None] = print) -> dict:
    """Fine-tune (or, frozen, linear-evaluate) the pretrained backbone and, with the same settings and
    steps, a random init."""
    out, info = {}, {}
    for init in ("pretrained", "random_init"):
        log(f"eval {s.protocol}: fitting the {init.replace('_', ' ')} backbone on Ray Train ...")
        m = run_finetune(state_path, train, val, init, s)
        out[init], info[init] = scores(m, s), run_info(m)
    return {"pretrained": out["pretrained"], "random_init": out["random_init"], "info": info}


def run_local_finetune(state_path: str, train: str, val: str, init: str, s: FinetuneSettings,
                       printer: Optional[Callable] = None) -> dict:
    """The same loop in this process (world size 1), for tests of the loop itself without Ray; ``s.save``
    is written as ``run_finetune`` writes it."""
    from .finetuned import check_save_dir

    save = bool(s.save) and init == "pretrained"
    if save:
        check_save_dir(s.save)
    return finetune_loop({"state_path": state_path, "train": train, "val": val, "init": init, "settings": asdict(s),
                          "save": save}, local_session(s.use_gpu, printer, s.save or None))


def local_session(use_gpu: str = "auto", printer: Optional[Callable] = None, save_dir: Optional[str] = None):
    """A session for ``finetune_loop`` outside Ray: each report lands in its ``history``; no checkpoints.
    The loop's classifier, when it hands one over, is written to ``save_dir`` (as ``run_finetune`` does:
    into a folder of its own, then kept there)."""
    from .finetuned import keep_saved
    from .session import LocalSession

    class _S(LocalSession):
        def report(self, metrics, state=None, final=False, save=None):
            self.history.append(dict(metrics))
            if save is not None and save_dir:
                with tempfile.TemporaryDirectory(prefix="sslray-classifier-") as d:
                    save(Path(d, SAVED))
                    keep_saved(Path(d, SAVED), save_dir)

    return _S(None, use_gpu, printer or print)


__all__ = ["FinetuneSettings", "Classifier", "OPTIMIZERS", "layer_decay_groups", "vit_layer_id", "finetune_loop",
           "finetune_compare", "run_finetune", "run_local_finetune", "local_session", "classification_metrics",
           "linear_sgd_settings", "make_optimizer", "with_drop_path", "scores", "run_info"]
