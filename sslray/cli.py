"""`sslray <command>`: the command line (every command and flag: docs/cli.md)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping, Optional, Sequence

from .config import ConfigError, absolute_paths, flag_overrides, load_config
from .storage import absolute as _abs


# Modules that add their own sub-commands (each has ``register(subparsers)``).
COMMAND_MODULES: list[str] = ["doctor", "submit", "compare", "ui", "tune.cli", "eval.cli"]
COMMAND_MODULES += ["study"]  # `sslray study`: methods x view policies (sslray/study.py)
COMMAND_MODULES += ["viewscmd"]  # `sslray views`: a method's augmented views of a .beton (sslray/viewscmd.py)
COMMAND_MODULES += ["export"]  # `sslray export`: a checkpoint's backbone as safetensors + JSON (sslray/export.py)
COMMAND_MODULES += ["eval.embed"]  # `sslray embed`: one split's embeddings as .npz (sslray/eval/embed.py)


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="built-in recipe name (sslray/configs/*.yaml) or a YAML file")
    p.add_argument("--method", help="SSL method (see `sslray methods`)")
    p.add_argument("--data", help="training .beton")
    p.add_argument("--val", help="labelled val .beton for the kNN monitor and the probe")
    p.add_argument("--backbone", help="timm backbone name, e.g. resnet18, vit_small_patch16_224")
    p.add_argument("--views", help="view policy on the method's preset (views.policy): default, simclr, "
                                   "orthogonality, lorot, dcl, mae")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch over all workers")
    p.add_argument("--auto-batch", action="store_true",
                   help="halve the global batch before training until a step fits in device memory (data.auto_batch)")
    p.add_argument("--lr", type=float, help="base lr per 256 images")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--gpu", choices=["auto", "true", "false"], help="use GPUs (auto: when the cluster has them)")
    p.add_argument("--storage", help="checkpoint storage: folder, shared mount, s3:// or gs://")
    p.add_argument("--name", help="run name under --storage; the same name again resumes that run")
    p.add_argument("--restart", action="store_true", help="start the named run over (the old one is moved aside)")
    p.add_argument("--checkpoint-every", help="checkpoint interval: N epochs (e.g. 2) or N steps (e.g. 500steps)")
    p.add_argument("--max-failures", type=int, help="worker-group restarts from the latest checkpoint (-1: no limit)")
    p.add_argument("--init-weights", metavar="PATH",
                   help="start the backbone from these weights: an `sslray export` folder or a timm state_dict file "
                        "(model.init_weights)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="any config key, e.g. optim.base_lr=0.3")


def parse_checkpoint_every(text: str) -> dict[str, int]:
    """``3`` / ``3epochs`` -> every 3 epochs; ``500steps`` -> every 500 steps (and every epoch end)."""
    t = text.strip().lower().replace(" ", "")
    for suffix, key in (("steps", "train.checkpoint_every_steps"), ("step", "train.checkpoint_every_steps"),
                        ("epochs", "train.checkpoint_every"), ("epoch", "train.checkpoint_every"), ("", "train.checkpoint_every")):
        if t.endswith(suffix) and t[: len(t) - len(suffix)].isdigit():
            return {key: int(t[: len(t) - len(suffix)])}
    raise ConfigError(f"--checkpoint-every {text!r}: expected N (epochs), Nepochs or Nsteps")


def config_from_args(a: argparse.Namespace):
    flags = {
        "method.name": a.method, "data.train": _abs(a.data), "data.val": _abs(a.val), "model.backbone": a.backbone,
        "train.epochs": a.epochs, "data.batch_size": a.batch_size, "optim.base_lr": a.lr, "ray.num_workers": a.workers,
        "ray.use_gpu": a.gpu, "ray.storage": a.storage, "ray.name": a.name, "tracking.tracking_uri": a.tracking_uri,
        "tracking.experiment": a.experiment, "views.policy": getattr(a, "views", None),
        "model.init_weights": getattr(a, "init_weights", None),
        "data.auto_batch": True if getattr(a, "auto_batch", False) else None,
        "ray.max_failures": getattr(a, "max_failures", None),
    }
    if getattr(a, "checkpoint_every", None):
        flags.update(parse_checkpoint_every(a.checkpoint_every))
    cfg = load_config(a.recipe, flag_overrides(flags, a.overrides))
    if cfg.views.policy != "default":  # an unknown or unfit view policy fails here, not in the workers
        from .datasets.policies import VIEW_POLICIES, check_policy

        VIEW_POLICIES.get(cfg.views.policy)
        check_policy(cfg.views.preset, cfg.views.policy)
    return absolute_paths(cfg)


def cmd_convert(a) -> int:
    from .api import convert

    convert(a.src, a.out, source=a.source, split=a.split, max_res=a.max_res, write_mode=a.write_mode,
            quality=a.quality, compress_probability=a.compress_probability, square=a.square, workers=a.workers,
            strict=a.strict, force=a.force, classes=a.classes, fraction=a.fraction, seed=a.seed)
    return 0


AFTER_TRAINING_TAG = "sslray.after_training_error"  # the export, probe or --eval failure of a finished run


def run_pretrain(cfg, probe: bool = True, probe_train_subset: int = 0, probe_val_subset: int = 0,
                 restart: bool = False, eval_protocols: Optional[str] = None, baseline: bool = True,
                 linear_c: Sequence[float] = (1.0,), eval_settings: Optional[Mapping[str, Any]] = None):
    """Pretrain, export, probe and evaluate as ``sslray pretrain`` does; returns an ``sslray.api.Run``.
    ``baseline=False`` scores no random-init backbone after training; ``linear_c``: the probes' C, or
    several to choose from on held-out train features (the probe and the linear and lowshot protocols).
    ``eval_settings``: the ``eval_protocols``' settings (``EvalContext`` fields: knn_ks, lowshot_fractions,
    finetune and linear_sgd ``FinetuneSettings``...); by default the Ray-trained protocols run on the
    training run's workers and the probe's subsets, with their default budgets."""
    from .api import Run
    from .raytrain.evaluate import format_table, log_probe, probe_checkpoint
    from .raytrain.runfolder import completed_epochs, resumes, run_location
    from .raytrain.trainer import pretrain
    from .tracking import Tracker

    if resumes(cfg, restart):
        # The same command again after the run ended (a notebook cell re-run, a "new" lr): Ray would
        # start, train nothing and say "finished".
        name, _, run_dir = run_location(cfg)
        done = completed_epochs(run_dir)
        if done is not None and done >= cfg.train.epochs:
            raise ConfigError(f"run {name} is already complete ({done}/{cfg.train.epochs} epochs in {run_dir}): "
                              f"nothing to train. Pass --restart to train it again from scratch, --name for a new "
                              f"run, or --epochs above {done} to train it further; `sslray probe {run_dir}` or "
                              f"`sslray eval --checkpoint {run_dir}` score it")
    # A file that does not fit this backbone fails here, not in every worker. A run that resumes
    # takes its weights from its checkpoint, so it needs the file no more.
    if cfg.model.init_weights and not resumes(cfg, restart):
        from .export import init_backbone
        from .raytrain.methods import create_method

        init_backbone(create_method(cfg), cfg.model.init_weights)
    if eval_protocols and not cfg.data.val:  # every protocol scores on a val split
        raise ValueError(f"--eval {eval_protocols} scores the checkpoint on a val split: give --val")
    if eval_settings and not eval_protocols:
        raise ValueError("eval_settings are the settings of the evaluate= protocols, and none were given")
    if eval_protocols:  # a bad setting (or --ft-save folder) fails now, not after hours of training
        from .eval.protocols import check_settings, parse_protocols

        eval_settings = eval_defaults(cfg, probe_train_subset, probe_val_subset, eval_settings)
        check_settings(parse_protocols(eval_protocols, option="--eval"), linear_c=linear_c, **eval_settings)
    if (eval_protocols or probe) and cfg.data.val and all(map(os.path.exists, (cfg.data.train, cfg.data.val))):
        from .datasets import DataError
        from .eval.features import check_labelled
        from .raytrain.trainer import check_data

        plan = check_data(cfg)  # the training run's own data checks first (they name the config keys)
        # The probe after training fits a classifier: a single-class split fails there, hours later.
        try:
            check_labelled(plan.val_info, "val")
            check_labelled(plan.train_info, "train")
        except DataError as e:
            raise DataError(f"{e} (or pretrain without the probe: --no-probe, and no --eval)") from None
    res = pretrain(cfg, restart=restart)
    print(f"sslray: run {res.name} finished; MLflow run {res.run_id} (experiment {cfg.tracking.experiment}) in "
          f"{res.tracking_uri}; checkpoint {res.checkpoint}")
    backbone = ev = report = None
    tracker = Tracker(res.tracking_uri, res.run_id)
    try:
        if cfg.train.export_backbone:
            from .export import export_after_training

            backbone = export_after_training(res.checkpoint, tracker)
        store = None
        if probe and eval_protocols and cfg.data.val and res.checkpoint:
            from .eval.runner import shared_store

            # The probe and the protocols score the same checkpoint, data, subsets and device: one store
            # extracts the frozen features and fits the linear probes once for both.
            store = shared_store(res.checkpoint, cfg.data.train, cfg.data.val, eval_protocols,
                                 train_subset=probe_train_subset, val_subset=probe_val_subset, use_gpu=cfg.ray.use_gpu)
        if probe and cfg.data.val and res.checkpoint:
            report = probe_checkpoint(res.checkpoint, cfg.data.train, cfg.data.val, train_subset=probe_train_subset,
                                      val_subset=probe_val_subset, knn_k=cfg.train.knn_k, use_gpu=cfg.ray.use_gpu,
                                      random_baseline=baseline, linear_c=linear_c, store=store)
            log_probe(tracker, report)
            print(format_table(report))
        if eval_protocols and res.checkpoint:  # `--eval linear,knn,...`: the protocols of `sslray eval`, same run
            from .eval import format_eval_table, log_eval, run_eval
            from .eval.runner import close_figures

            ev = run_eval(res.checkpoint, cfg.data.train, cfg.data.val or None, eval_protocols,
                          train_subset=probe_train_subset, val_subset=probe_val_subset, use_gpu=cfg.ray.use_gpu,
                          store=store, baseline=baseline, linear_c=linear_c, **eval_settings)
            log_eval(tracker, ev)
            close_figures(ev)
            print(format_eval_table(ev))
    except BaseException as e:
        # Training finished and its checkpoint is kept: the run ends FINISHED (a RUNNING run is left out of
        # `sslray compare`), tagged with what failed after it. An MLflow outage here must not hide `e`.
        try:
            tracker.set_tags({AFTER_TRAINING_TAG: f"{type(e).__name__}: {e}"[:4000]})
            tracker.end()
        except Exception as m:  # noqa: BLE001
            print(f"sslray: could not record the failure in MLflow run {res.run_id} ({m})", file=sys.stderr)
        raise
    tracker.end()
    return Run(res.run_id, res.tracking_uri, res.checkpoint, res.metrics, res.name, res.storage, backbone, report, ev)


def run_finetune_base(cfg, train_subset: int, val_subset: int):
    """The ``FinetuneSettings`` of ``pretrain --eval``'s Ray-trained protocols before their budget: the
    training run's workers, device and seed, on the probe's subsets."""
    from .raytrain.finetune import FinetuneSettings

    return FinetuneSettings(num_workers=cfg.ray.num_workers, cpus_per_worker=cfg.ray.cpus_per_worker,
                            use_gpu=cfg.ray.use_gpu, seed=cfg.train.seed, train_subset=train_subset,
                            val_subset=val_subset)


def eval_defaults(cfg, train_subset: int, val_subset: int, settings: Optional[Mapping[str, Any]] = None) -> dict:
    """``pretrain --eval``'s protocol settings: ``settings``, and for the Ray-trained protocols not given
    there the default budgets on the training run's workers, device and seed and the probe's subsets."""
    import dataclasses

    from .eval.protocols import EvalContext
    from .raytrain.finetune import linear_sgd_settings

    out = dict(settings or {})
    # pretrain's own arguments (linear_c, baseline, the probe's subsets) and the store are not settings
    known = {f.name for f in dataclasses.fields(EvalContext)} - {"store", "log", "linear_c", "baseline"}
    unknown = sorted(set(out) - known)
    if unknown:
        raise ValueError(f"eval_settings: {', '.join(unknown)} is not a protocol setting; expected some of "
                         f"{', '.join(sorted(known))} (linear_c, baseline and the subsets are pretrain's arguments)")
    if out.get("finetune") is None:
        out["finetune"] = run_finetune_base(cfg, train_subset, val_subset)
    if out.get("linear_sgd") is None:
        out["linear_sgd"] = linear_sgd_settings(out["finetune"])
    return out


def _linear_c(text: str) -> tuple[float, ...]:
    """``--linear-c 0.01,0.1,1``: checked here, before any training or feature extraction."""
    from .eval.cli import _numbers
    from .raytrain.probe import linear_cs

    return linear_cs(_numbers(text, float, "--linear-c"))


def cmd_pretrain(a) -> int:
    from .eval.cli import protocol_flags_given, protocol_settings

    cfg = config_from_args(a)
    linear_c = _linear_c(a.linear_c)
    train_subset, val_subset = a.probe_train_subset or cfg.data.train_subset, a.probe_val_subset or cfg.data.val_subset
    settings = None
    if a.eval:  # an unknown protocol or a bad setting fails now, not after hours of training
        from .eval import parse_protocols

        parse_protocols(a.eval, option="--eval")
        settings = protocol_settings(a, run_finetune_base(cfg, train_subset, val_subset))
    elif protocol_flags_given(a):
        raise ValueError(f"{', '.join(protocol_flags_given(a))}: settings of the --eval protocols, and no --eval "
                         "was given (e.g. --eval linear_sgd --lin-epochs 20)")
    run_pretrain(cfg, probe=not a.no_probe, probe_train_subset=train_subset, probe_val_subset=val_subset,
                 restart=a.restart, eval_protocols=a.eval, baseline=not a.no_baseline, linear_c=linear_c,
                 eval_settings=settings)
    return 0


def cmd_probe(a) -> int:
    from .raytrain.evaluate import format_table, log_probe, probe_checkpoint
    from .tracking import existing_run

    linear_c = _linear_c(a.linear_c)
    tracker = existing_run(a.tracking_uri, a.run_id) if a.run_id else None  # before the features are extracted
    report = probe_checkpoint(a.checkpoint, _abs(a.train), _abs(a.val), train_subset=a.train_subset,
                              val_subset=a.val_subset, knn_k=a.k, use_gpu=a.gpu, random_baseline=not a.no_baseline,
                              linear_c=linear_c)
    print(format_table(report))
    print(report.probe.report)
    if tracker is not None:
        log_probe(tracker, report)
        print(f"sslray: probe metrics logged to MLflow run {a.run_id}")
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    return run_demo(a)


def cmd_methods(a) -> int:
    from .config import _module_names
    from .methodinfo import method_lines  # not the registry: that imports torch and timm (~4 s)

    print("\n".join(method_lines(_module_names(a.plugins, "--plugins") if a.plugins else ())))
    return 0


def count(minimum: int = 0):
    """An argparse type: an integer of at least ``minimum`` (image counts, neighbours), named in the error."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {n}")
        return n
    return parse


def add_probe_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--no-baseline`` and ``--linear-c``, as ``sslray eval`` has them."""
    p.add_argument("--no-baseline", action="store_true",
                   help=f"{what}: score the pretrained backbone only (no random-init features, fits or gains)")
    p.add_argument("--linear-c", default="1.0", metavar="C[,C...]",
                   help=f"{what}: linear probe C; several (e.g. 0.01,0.1,1,10): the best on a held-out 10%% of the "
                        "train features, refitted on all of them (logged as *_linear_c)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sslray", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="image source -> FFCV .beton + manifest")
    c.add_argument("src", help="source folder (ImageFolder: SRC/<class>/<image>), or a CSV file for --source csv")
    c.add_argument("out", help="output .beton path; OUT.manifest.json and OUT.paths.txt (the source file of each "
                                 "row) are written beside it")
    c.add_argument("--source", default="imagefolder",
                   help="imagefolder (default), imagenet100, cifar10, cifar100, unlabelled, csv (docs/datasets.md)")
    c.add_argument("--split", help="split to convert: an ImageFolder sub-folder (e.g. train); train/val for "
                                   "imagenet100; train/test for cifar10/cifar100")
    c.add_argument("--classes", help="class subset: N (the first N classes, sorted) or a comma list of names")
    c.add_argument("--fraction", type=float, help="keep this fraction of each class, e.g. 0.1 (seeded by --seed)")
    c.add_argument("--seed", type=int, default=0, help="seed for --fraction")
    c.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "proportion", "smart"])
    c.add_argument("--max-res", type=int, default=256, help="longest side kept, px; bounds file size and RAM")
    c.add_argument("--quality", type=int, default=90, help="JPEG quality for write mode jpg/proportion")
    c.add_argument("--compress-probability", type=float, default=0.5, help="share stored as JPEG in proportion mode")
    c.add_argument("--square", default="crop", choices=["crop", "pad", "squash"],
                   help="non-square images: crop (stored as they are; the loader sees their centre square), pad "
                        "(letterboxed whole into a square, grey borders) or squash (resized whole to a square)")
    c.add_argument("--workers", type=int, default=0, help="processes (default: CPU count, at most 8)")
    c.add_argument("--strict", action="store_true",
                   help="check every image and exit 2 listing the unreadable ones, instead of skipping them")
    c.add_argument("--force", action="store_true",
                   help="convert even when the manifest says it is up to date, or replace an OUT made from "
                        "another source, split or subset, or a .beton without a manifest")
    c.set_defaults(func=cmd_convert)

    p = sub.add_parser("pretrain", help="self-supervised pretraining with Ray Train, then probe, logged to MLflow")
    add_run_args(p)
    p.add_argument("--no-probe", action="store_true", help="skip the offline linear probe after training")
    p.add_argument("--probe-train-subset", type=count(), default=0,
                   help="train images for the probe and --eval (0: as training)")
    p.add_argument("--probe-val-subset", type=count(), default=0,
                   help="val images for the probe and --eval (0: as data.val_subset)")
    p.add_argument("--eval", metavar="PROTOCOLS",
                   help="after training, also run these eval protocols (e.g. linear,knn,lowshot; see `sslray eval`)")
    add_probe_args(p, "the probe and --eval after training")
    from .eval.cli import add_protocol_args

    add_protocol_args(p, ft_workers="finetune and linear_sgd: Ray Train workers (default: the run's ray.num_workers)",
                      title="--eval protocol settings")
    p.set_defaults(func=cmd_pretrain)

    q = sub.add_parser("probe", help="linear probe + kNN on frozen features, beside a random-init baseline")
    q.add_argument("--checkpoint", required=True, help="state.pt, a checkpoint folder, or a run folder")
    q.add_argument("--train", required=True, help="labelled .beton to fit the probe on")
    q.add_argument("--val", required=True, help="labelled .beton to score it on")
    q.add_argument("--train-subset", type=count(), default=0, help="seeded subset of train images (0: all)")
    q.add_argument("--val-subset", type=count(), default=0, help="seeded subset of val images (0: all)")
    q.add_argument("-k", type=count(1), default=200, help="kNN neighbours")
    q.add_argument("--gpu", default="auto", choices=["auto", "true", "false"])
    add_probe_args(q, "the probe")
    q.add_argument("--run-id", help="MLflow run to log the probe metrics to")
    q.add_argument("--tracking-uri")
    q.set_defaults(func=cmd_probe)

    d = sub.add_parser("demo", help="CIFAR-10 end to end: extract, convert, pretrain on Ray, probe, MLflow")
    d.add_argument("--data-dir", default="demo-data", help="where the dataset is extracted and converted")
    d.add_argument("--archive", help="CIFAR-10 ImageFolder tar.gz (default: ../shared/data/cifar10-jpeg.tar.gz)")
    d.add_argument("--epochs", type=int)
    d.add_argument("--train-subset", type=int)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--tracking-uri")
    d.add_argument("overrides", nargs="*", metavar="section.key=value")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("methods", help="list the registered SSL methods: family and built-in recipes")
    m.add_argument("--plugins", metavar="MODULES", help="also the methods these method.plugins modules register "
                                                          "(comma-separated, e.g. mylab.ssl_methods)")
    m.set_defaults(func=cmd_methods)
    for mod in COMMAND_MODULES:  # each owns its sub-commands: register(subparsers)
        import importlib

        importlib.import_module(f"sslray.{mod}").register(sub)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"sslray {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"sslray {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - name the failure, keep the traceback for debugging
        from .datasets import ConversionError, DataError, SourceError
        from .raytrain.runfolder import StorageError

        if isinstance(e, (ConversionError, DataError, SourceError, StorageError)):
            print(f"sslray {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
