"""The Python API: what the command line does, as functions that return results (for notebooks and
scripts). ``import sslray`` stays light; each function imports torch, Ray or MLflow when called.

    import sslray

    sslray.convert("/data/cifar10/train", "train.beton", max_res=32)
    cfg = sslray.load_config("simclr_cifar10", {"data.train": "train.beton", "data.val": "test.beton",
                                                "train.epochs": 50})
    run = sslray.pretrain(cfg)                  # Ray Train workers, MLflow run, probe, export
    run.probe.pretrained["linear_top1"], run.checkpoint, run.run_id
    metrics = sslray.train_local(cfg, "runs/local")   # one process, no Ray, no MLflow
    backbone, meta = sslray.load_backbone(run.backbone)   # the exported backbone (timm), any machine
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config
    from .eval.runner import EvalReport
    from .raytrain.evaluate import ProbeReport
    from .tune.sweep import SweepResult


def load_config(recipe: Optional[str] = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> "Config":
    """A run's configuration: built-in recipe name (``sslray methods`` lists the methods; recipes are
    ``sslray/configs/*.yaml``) or a YAML path, then ``{"section.key": value}`` or ``["section.key=value"]``
    overrides. Unknown keys and values outside a key's choices raise ``ConfigError`` naming the key."""
    from .config import load_config as load

    return load(recipe, overrides)


def convert(src: str | os.PathLike, out: str | os.PathLike, *, source: str = "imagefolder",
            split: Optional[str] = None, max_res: int = 256, write_mode: str = "jpg", quality: int = 90,
            compress_probability: float = 0.5, square: str = "crop", workers: int = 0, strict: bool = False,
            force: bool = False, **kw: Any) -> dict:
    """``sslray convert``: images -> ``out`` (.beton) + ``out``'s manifest and paths list; returns the
    manifest. ``square``: crop, pad or squash (how non-square images are stored); ``kw``: ``classes``,
    ``fraction``, ``seed``, and source options."""
    from .datasets import WriteParams
    from .datasets import convert as run

    params = WriteParams(write_mode=write_mode, max_resolution=max_res, jpeg_quality=quality,
                         compress_probability=compress_probability, square=square)
    return run(src, out, source=source, split=split, params=params, workers=workers, strict=strict, force=force,
               **kw)


@dataclass
class Run:
    """What ``pretrain`` returns: the MLflow run, the last checkpoint, the last epoch's metrics, the
    probe report (pretrained beside random init) and, when ``evaluate`` was asked for, its report."""
    run_id: str
    tracking_uri: str
    checkpoint: Optional[str]
    metrics: dict
    name: str
    storage: str
    backbone: Optional[str] = None  # where the exported backbone went (load with ``load_backbone``)
    probe: Optional["ProbeReport"] = None
    eval: Optional["EvalReport"] = None


def pretrain(cfg: "Config", *, probe: bool = True, restart: bool = False, evaluate: Optional[str] = None,
             probe_train_subset: Optional[int] = None, probe_val_subset: Optional[int] = None,
             baseline: bool = True, linear_c: Sequence[float] = (1.0,),
             eval_settings: Optional[Mapping[str, Any]] = None) -> Run:
    """``sslray pretrain``: train ``cfg`` with ``cfg.ray.num_workers`` Ray Train workers (a local Ray
    instance unless ``RAY_ADDRESS`` names a cluster), log it to MLflow, export the backbone, probe it
    beside a random-init backbone when ``cfg.data.val`` is set, and run ``evaluate`` protocols
    (``"linear,knn,lowshot"``...). The same ``cfg.ray.name`` resumes; ``restart=True`` starts over.
    ``baseline=False``: no random-init baseline; ``linear_c``: the linear probes' C, chosen on held-out
    train features when several are given (``--no-baseline``, ``--linear-c``). ``eval_settings``: the
    protocols' settings, as ``run_eval`` takes them (``{"knn_ks": [20], "finetune": FinetuneSettings(
    epochs=5, num_workers=4, use_gpu="true")}``; the ``--knn-k``, ``--ft-*`` and ``--lin-*`` flags);
    a Ray-trained protocol left out runs its default budget on the training run's workers, device and seed
    and the probe's subsets (``linear_sgd`` without its own: ``linear_sgd_settings(finetune)``)."""
    from .cli import run_pretrain
    from .config import absolute_paths

    cfg = absolute_paths(cfg)
    return run_pretrain(cfg, probe=probe, restart=restart, eval_protocols=evaluate, baseline=baseline,
                        linear_c=tuple(linear_c), eval_settings=eval_settings,
                        probe_train_subset=cfg.data.train_subset if probe_train_subset is None else probe_train_subset,
                        probe_val_subset=cfg.data.val_subset if probe_val_subset is None else probe_val_subset)


def sweep(cfg: "Config", space: Optional[Mapping[str, Any] | Sequence[str]] = None, *, name: str,
          storage: str = "./runs", num_samples: int = 8, scheduler: str = "asha", metric: str = "knn_top1",
          **kw: Any) -> "SweepResult":
    """``sslray tune``: a Ray Tune search over ``space`` (``{"lr": "loguniform(1e-3,1)", "temperature":
    "choice(0.1,0.2)"}``, or ``None`` for the method's default space) around ``cfg``, each trial a Ray
    Train run of at most ``cfg.train.epochs`` epochs, early-stopped by ASHA on ``metric``, every trial
    and the summary in MLflow. ``result.best`` / ``result.best_config`` / ``result.rows``; the same
    ``name``/``storage`` resumes. ``kw``: search, mode, grace_period, reduction_factor, grid_points,
    gpus_per_worker, max_concurrent, seed, tracking_uri, experiment, verbose (docs/tune.md)."""
    from .tune.cli import sweep_config

    return sweep_config(cfg, space, name=name, storage=storage, num_samples=num_samples, scheduler=scheduler,
                        metric=metric, **kw)


def train_local(cfg: "Config", checkpoint_dir: Optional[str | os.PathLike] = None) -> dict:
    """The same training loop in this process: no Ray, no MLflow (a bare GPU machine, a notebook, a
    debugger). Checkpoints go to ``checkpoint_dir`` (resumed from when it holds some; the
    ``ray.num_to_keep`` newest are kept, as under Ray). Returns the last epoch's metrics."""
    from .raytrain.loop import run_local

    last, _ = run_local(cfg, None if checkpoint_dir is None else str(checkpoint_dir), keep=cfg.ray.num_to_keep)
    return last


def probe(checkpoint: str | os.PathLike, train: str, val: str, *, train_subset: int = 0, val_subset: int = 0,
          knn_k: int = 200, use_gpu: str = "auto", random_baseline: bool = True,
          linear_c: Sequence[float] = (1.0,)) -> "ProbeReport":
    """``sslray probe``: kNN and a linear probe on frozen features of a checkpoint (a ``state.pt``, its
    folder, a run folder, or an ``s3://``/``gs://`` location), beside a random-init backbone.
    ``report.pretrained`` / ``report.random_init`` hold the metrics."""
    from .raytrain.evaluate import probe_checkpoint

    return probe_checkpoint(str(checkpoint), str(train), str(val), train_subset=train_subset, val_subset=val_subset,
                            knn_k=knn_k, use_gpu=use_gpu, random_baseline=random_baseline,
                            linear_c=tuple(linear_c))


def evaluate(checkpoint: str | os.PathLike, protocols: str | Sequence[str] = "linear,knn", *,
             train: Optional[str] = None, val: Optional[str] = None, **kw: Any) -> "EvalReport":
    """``sslray eval``'s protocols (linear, knn, finetune, linear_sgd, lowshot, embed) on a checkpoint;
    ``train``/``val`` default to the checkpoint's own splits. ``kw`` as ``sslray.eval.run_eval``.
    Returns the report and logs nothing; ``sslray.eval.runner.log_eval(Tracker(uri, run_id), report)``
    logs it as ``sslray eval`` does."""
    from .eval import run_eval

    return run_eval(str(checkpoint), train, val, protocols, **kw)


def embed(checkpoint: str | os.PathLike, data: str | os.PathLike, *, weights: Optional[str] = None,
          head: bool = False, use_gpu: str = "auto", progress: bool = True, **transform: Any) -> dict:
    """``sslray embed``: one split's frozen embeddings as arrays (``embeddings`` N x D float32, ``labels``
    and ``classes`` when labelled, ``paths`` when the file names are known, ``meta``), written nowhere.
    ``checkpoint``: an sslray checkpoint, an export folder or ``timm:<name>`` (``weights``: a state_dict
    for it); ``transform``: ``crop_size``, ``mean``, ``std``, ``cifar_stem`` as the command's options."""
    from .eval.embed import embed_data
    from .eval.source import SourceOptions

    return embed_data(str(checkpoint), str(data), source=SourceOptions(weights=weights, **transform), head=head,
                      use_gpu=use_gpu, progress=progress)


def export_backbone(checkpoint: str | os.PathLike, out: str | os.PathLike, which: str = "student",
                    force: bool = False) -> str:
    """``sslray export``: a checkpoint's backbone -> ``out/backbone.safetensors`` + ``backbone.json``
    (``out`` may be ``s3://``/``gs://``). Returns where the files went."""
    from .export import export_to

    return export_to(checkpoint, out, which, force)[1]


def load_backbone(path: str | os.PathLike, device: str = "cpu"):
    """``(timm backbone, metadata)`` from an export (folder, its weights file, or a remote location)."""
    from .export import load_backbone as load

    return load(path, device)


__all__ = ["Run", "convert", "embed", "evaluate", "export_backbone", "load_backbone", "load_config", "pretrain", "probe",
           "sweep", "train_local"]
