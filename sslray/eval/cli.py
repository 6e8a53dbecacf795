"""`sslray eval --protocol linear,knn,finetune,linear_sgd,lowshot,embed`: evaluation protocols on a
checkpoint, an exported backbone or a timm model; `sslray embed`: one split's embeddings as .npz."""

from __future__ import annotations


def _numbers(text: str, kind: type, option: str) -> list:
    try:
        return [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected a comma list of {kind.__name__}s") from None


def source_options(a):
    """``--weights``, ``--crop-size``, ``--mean``, ``--std``, ``--cifar-stem`` -> ``SourceOptions``."""
    from .source import SourceOptions

    return SourceOptions(weights=a.weights, crop_size=a.crop_size,
                         mean=tuple(_numbers(a.mean, float, "--mean")) if a.mean else (),
                         std=tuple(_numbers(a.std, float, "--std")) if a.std else (), cifar_stem=a.cifar_stem)


def add_source_args(p) -> None:
    """``--checkpoint`` (an sslray checkpoint or another source) and how to feed it (eval, embed)."""
    from ..cli import count

    p.add_argument("--checkpoint", required=True,
                   help="state.pt, a checkpoint folder, or a run folder; an `sslray export` folder; or timm:NAME "
                        "(with --weights FILE for another tool's backbone)")
    p.add_argument("--weights", metavar="FILE",
                   help="with --checkpoint timm:NAME: a state_dict to load (.safetensors, .pt, .pth; another tool's "
                        "backbone); without it the timm model keeps its seeded random init")
    p.add_argument("--crop-size", type=count(1), default=0,
                   help="eval input size, px (default: the checkpoint's or backbone.json's, else the data's "
                        "resolution)")
    p.add_argument("--mean", metavar="R,G,B", help="eval normalisation mean (default: the checkpoint's or "
                                                   "backbone.json's, else ImageNet's); give --std with it")
    p.add_argument("--std", metavar="R,G,B", help="eval normalisation std (see --mean)")
    p.add_argument("--cifar-stem", action="store_true",
                   help="with timm:NAME: a ResNet with a 3x3 stride-1 first conv and no max-pool (CIFAR weights)")


def add_protocol_args(p, ft_workers: str, title: str = "protocol settings") -> None:
    """The protocols' settings: kNN neighbours and temperatures, low-shot fractions and seeds, and the
    budgets of the Ray-trained protocols (``--ft-*``, ``--lin-*``); ``sslray eval`` and ``sslray pretrain
    --eval`` take the same flags (``protocol_settings`` reads them)."""
    from ..cli import count

    p = p.add_argument_group(title)
    p.add_argument("--knn-k", default="10,20,100,200", help="kNN neighbour counts")
    p.add_argument("--knn-temperature", metavar="T[,T...]",
                   help="kNN vote temperatures, each scored with every k (default: the checkpoint's "
                        "train.knn_temperature); several name their metrics eval_knn_k{k}_t{T}_top1")
    p.add_argument("--lowshot-fractions", default="0.01,0.1,1.0", help="label fractions per class")
    p.add_argument("--lowshot-seeds", default="0,1,2", help="seeds of the stratified subsets")
    p.add_argument("--ft-epochs", type=int, default=10, help="finetune: epochs (the same for the scratch run)")
    p.add_argument("--ft-max-steps", type=int, default=0, help="finetune: cap on optimizer steps (0: none)")
    p.add_argument("--ft-batch-size", type=int, default=256, help="finetune: global batch")
    p.add_argument("--ft-lr", type=float, default=1e-3, help="finetune: AdamW lr per 256 images")
    p.add_argument("--ft-layer-decay", type=float, default=0.75, help="finetune: ViT layer-wise lr decay")
    p.add_argument("--ft-views", default="mae", help="finetune: view preset for the train images")
    p.add_argument("--ft-workers", type=count(1), default=None, help=ft_workers)
    p.add_argument("--ft-weight-decay", type=float, default=0.05,
                   help="finetune: AdamW weight decay (none on biases, norms and tokens)")
    p.add_argument("--ft-label-smoothing", type=float, default=0.1, help="finetune: label smoothing of the loss")
    p.add_argument("--ft-drop-path", type=float, default=0.0,
                   help="finetune: stochastic depth rate (timm drop_path_rate; ViTs, ResNets, ConvNeXts)")
    p.add_argument("--ft-save", metavar="DIR",
                   help="finetune: write the fine-tuned pretrained-init classifier (backbone + head, the `sslray "
                        "export` format plus head.safetensors) to DIR, a new or empty folder or s3:// / gs:// URI")
    p.add_argument("--lin-epochs", type=int, default=100, help="linear_sgd: epochs of the frozen-backbone linear head")
    p.add_argument("--lin-max-steps", type=int, default=0, help="linear_sgd: cap on optimizer steps (0: none)")
    p.add_argument("--lin-batch-size", type=int, default=256, help="linear_sgd: global batch")
    p.add_argument("--lin-lr", type=float, default=0.1,
                   help="linear_sgd: SGD (momentum 0.9, no weight decay) lr per 256 images, cosine to 0")


def protocol_flags_given(a) -> list[str]:
    """The protocol-settings flags set on ``a``'s command line (for ``sslray pretrain`` without ``--eval``,
    where they would go unused)."""
    import argparse

    bare = argparse.ArgumentParser(add_help=False)
    add_protocol_args(bare, "")
    return ["--" + k.replace("_", "-") for k, v in vars(bare.parse_args([])).items() if getattr(a, k) != v]


def protocol_settings(a, base) -> dict:
    """``add_protocol_args``' flags -> ``run_eval``'s protocol settings (``EvalContext`` fields). ``base``:
    the ``FinetuneSettings`` of where the Ray-trained protocols run (workers, device, seed, subsets),
    which the ``--ft-*`` flags complete; ``--ft-workers`` replaces its worker count."""
    import dataclasses

    from ..raytrain.finetune import linear_sgd_settings

    ft = dataclasses.replace(base, epochs=a.ft_epochs, max_steps=a.ft_max_steps, batch_size=a.ft_batch_size,
                             base_lr=a.ft_lr, layer_decay=a.ft_layer_decay, views=a.ft_views,
                             num_workers=a.ft_workers or base.num_workers, weight_decay=a.ft_weight_decay,
                             label_smoothing=a.ft_label_smoothing, drop_path=a.ft_drop_path, save=a.ft_save or "")
    return {"knn_ks": _numbers(a.knn_k, int, "--knn-k"),
            "knn_temperature": _numbers(a.knn_temperature, float, "--knn-temperature")
            if a.knn_temperature is not None else None,
            "lowshot_fractions": _numbers(a.lowshot_fractions, float, "--lowshot-fractions"),
            "lowshot_seeds": _numbers(a.lowshot_seeds, int, "--lowshot-seeds"), "finetune": ft,
            "linear_sgd": linear_sgd_settings(ft, epochs=a.lin_epochs, base_lr=a.lin_lr, max_steps=a.lin_max_steps,
                                              batch_size=a.lin_batch_size)}


def cmd_eval(a) -> int:
    from ..cli import _abs
    from ..tracking import Tracker, existing_run
    from .protocols import parse_protocols
    from .runner import close_figures, find_run, format_eval_table, log_eval, run_eval
    from .source import source_kind

    names = parse_protocols(a.protocol)  # before any data or model is touched
    opts = source_options(a)
    if a.run_id and not a.no_log:
        existing_run(a.tracking_uri, a.run_id)  # a run id or store that is not there, before the protocols run
    from ..raytrain.finetune import FinetuneSettings

    settings = protocol_settings(a, FinetuneSettings(use_gpu=a.gpu, train_subset=a.train_subset,
                                                     val_subset=a.val_subset))
    report = run_eval(a.checkpoint, _abs(a.train), _abs(a.val), names, train_subset=a.train_subset,
                      val_subset=a.val_subset, use_gpu=a.gpu, cache_dir=a.cache_dir, cache=not a.no_cache,
                      baseline=not a.no_baseline, linear_c=_numbers(a.linear_c, float, "--linear-c"), source=opts,
                      **settings)
    print(format_eval_table(report))
    run = {"run_id": a.run_id, "tracking_uri": a.tracking_uri} if a.run_id else find_run(a.checkpoint)
    if run and not a.no_log:
        log_eval(Tracker(a.tracking_uri or run.get("tracking_uri"), run["run_id"]), report)
        print(f"sslray: eval metrics and artifacts logged to MLflow run {run['run_id']}")
    elif not a.no_log and source_kind(a.checkpoint) != "checkpoint":
        print(f"sslray: {a.checkpoint} is no sslray checkpoint, so no pretraining run is looked up; "
              "pass --run-id to log")
    elif not a.no_log:
        print("sslray: no MLflow run found for this checkpoint (no sslray_run.json above it); pass --run-id to log")
    close_figures(report)
    return 0


def register(sub) -> None:
    from ..cli import count

    e = sub.add_parser("eval", help="evaluation protocols on a checkpoint: linear, knn, finetune, linear_sgd, lowshot, "
                                    "embed")
    add_source_args(e)
    e.add_argument("--protocol", required=True,
                   help="one or more of linear,knn,finetune,linear_sgd,lowshot,embed (comma list)")
    e.add_argument("--train", help="labelled .beton to fit on (default: the checkpoint's data.train)")
    e.add_argument("--val", help="labelled .beton to score on (default: the checkpoint's data.val)")
    e.add_argument("--train-subset", type=count(), default=0, help="seeded random subset of train images (0: all)")
    e.add_argument("--val-subset", type=count(), default=0, help="seeded random subset of val images (0: all)")
    e.add_argument("--gpu", default="auto", choices=["auto", "true", "false"])
    e.add_argument("--run-id", help="MLflow run to log to (default: the pretraining run of the checkpoint)")
    e.add_argument("--tracking-uri")
    e.add_argument("--no-log", action="store_true", help="print only, log nothing to MLflow")
    e.add_argument("--cache-dir", help="feature cache folder (default: features/ beside the checkpoint)")
    e.add_argument("--no-cache", action="store_true", help="always extract features, write no cache")
    e.add_argument("--no-baseline", action="store_true",
                   help="score the pretrained backbone only: no random-init features, fits or fine-tune, no gains")
    e.add_argument("--linear-c", default="1.0", metavar="C[,C...]",
                   help="linear and lowshot probes: LogisticRegression C; several (e.g. 0.01,0.1,1,10): the best on "
                        "a held-out 10%% of the train features, refitted on all of them (logged as eval_linear_c)")
    add_protocol_args(e, ft_workers="finetune and linear_sgd: Ray Train workers (default 2)")
    e.set_defaults(func=cmd_eval)
