"""`sslray tune`: hyperparameter search over Ray Train runs, early stopping on probe metrics, MLflow."""

from __future__ import annotations

import argparse

from ..config import CONFIG_DIR, ConfigError, absolute_paths, flag_overrides, load_config
from ..storage import absolute as _abs


def register(sub) -> None:
    t = sub.add_parser("tune", help="hyperparameter search (Ray Tune + ASHA) over Ray Train runs, tracked in MLflow",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--method", help="SSL method; its recipe <method>_cifar10 is the base unless --recipe is given")
    t.add_argument("--recipe", help="base recipe (built-in name or YAML file)")
    t.add_argument("--data", help="training .beton")
    t.add_argument("--val", help="labelled val .beton (the kNN metric is measured on it)")
    t.add_argument("--space", action="append", default=[], metavar="KEY=DIST|FILE.yaml",
                   help="one searched key per flag, e.g. --space 'lr=loguniform(1e-3,1)' --space "
                        "'temperature=choice(0.1,0.2)', or a YAML file. Without it, the method's default space "
                        "(docs/tune.md)")
    t.add_argument("--num-samples", type=int, default=8, help="trials (with --search grid: repeats of the grid)")
    t.add_argument("--scheduler", default="asha", choices=["asha", "median", "pbt", "fifo"])
    t.add_argument("--search", default="random", choices=["random", "grid", "optuna"])
    t.add_argument("--grid-points", type=int, default=3, help="points per continuous range for --search grid")
    t.add_argument("--metric", default="knn_top1", help="per-epoch metric the scheduler reads")
    t.add_argument("--mode", default="max", choices=["max", "min"])
    t.add_argument("--max-epochs", type=int, default=None, help="epochs of a trial that is never stopped")
    t.add_argument("--grace-period", type=int, default=1, help="epochs before a trial can be stopped")
    t.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/N of trials at each rung")
    t.add_argument("--workers-per-trial", type=int, default=None, help="Ray Train workers per trial")
    t.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 if the cluster has GPUs, else 0")
    t.add_argument("--max-concurrent", type=int, default=0, help="0: as many trials as the cluster fits")
    t.add_argument("--seed", type=int, default=0, help="seed of the search")
    t.add_argument("--name", required=True, help="sweep name; rerun with the same --name/--storage to resume")
    t.add_argument("--storage", default="./runs",
                   help="trial state and checkpoints: a folder (local or shared), s3:// or gs://")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    t.add_argument("--experiment", default="sslray-tune", help="MLflow experiment")
    t.add_argument("--export", metavar="BEST.yaml", help="write the best trial's config as a recipe")
    t.add_argument("--quiet", action="store_true", help="no live trial table")
    t.add_argument("overrides", nargs="*", metavar="section.key=value", help="fixed config keys for every trial")
    t.set_defaults(func=cmd_tune)


def base_config(a):
    from .space import looks_like_dist

    recipe = a.recipe
    if not recipe and a.method and (CONFIG_DIR / f"{a.method}_cifar10.yaml").exists():
        recipe = f"{a.method}_cifar10"
    flags = {"method.name": a.method, "data.train": _abs(a.data), "data.val": _abs(a.val),
             "ray.num_workers": a.workers_per_trial, "train.epochs": a.max_epochs}
    for o in a.overrides:  # `--space "a=..." "b=uniform(..)"`: the second one lands here, as a fixed key
        if looks_like_dist(o.partition("=")[2]):
            raise ConfigError(f"{o!r} is a search space given as a fixed key: give each searched key its own "
                              f"--space (--space \"{o}\")")
    return load_config(recipe, flag_overrides(flags, a.overrides))


def sweep_config(cfg, space=None, *, name: str, storage: str = "./runs", num_samples: int = 8,
                 scheduler: str = "asha", search: str = "random", metric: str = "knn_top1", mode: str = "max",
                 grace_period: int = 1, reduction_factor: float = 2.0, grid_points: int = 3,
                 gpus_per_worker=None, max_concurrent: int = 0, seed: int = 0, tracking_uri=None,
                 experiment: str = "sslray-tune", verbose: int = 1):
    """Search ``space`` (``["lr=loguniform(1e-3,1)", ...]``, ``{"lr": "loguniform(1e-3,1)"}``, YAML files;
    ``None``: the method's default space) around ``cfg``, each trial a Ray Train run of
    ``cfg.train.epochs`` epochs at most; returns the ``SweepResult``. The same ``name``/``storage`` resumes."""
    from ..raytrain.methods import check_method_config
    from ..raytrain.trainer import check_data
    from .space import canonical_key, check_space, default_space, parse_dist, parse_space
    from .sweep import default_gpus_per_worker, make_spec, run_sweep

    if not cfg.data.train:
        raise ConfigError("give the training data: --data TRAIN.beton (config key 'data.train')")
    cfg = absolute_paths(cfg)
    # Everything a trial would refuse, before Ray starts: the search space against the config, the data
    # (as pretrain checks it, at the smallest batch searched), the method's keys, the sweep's options.
    if isinstance(space, dict):  # values as in a --space YAML file: "loguniform(1e-3,1)", [0.1, 0.2], ...
        space = {canonical_key(str(k)): parse_dist(v, str(k)) for k, v in space.items()}
    else:
        space = parse_space(space) if space else default_space(cfg)
    check_space(space, cfg, search, grid_points)
    batches = space.get("data.batch_size")
    if batches is not None and batches.kind in ("choice", "grid"):
        check_data(cfg.replace(**{"data.batch_size": min(int(b) for b in batches.args)}))
    else:
        check_data(cfg)
    check_method_config(cfg)
    kw = dict(name=name, storage=_abs(storage), num_samples=num_samples, scheduler=scheduler, search=search,
              metric=metric, mode=mode, max_epochs=cfg.train.epochs, grace_period=grace_period,
              reduction_factor=reduction_factor, grid_points=grid_points, max_concurrent=max_concurrent, seed=seed)
    make_spec(cfg, space, gpus_per_worker=gpus_per_worker or 0.0, **kw)
    if gpus_per_worker is None:
        gpus_per_worker = default_gpus_per_worker("sslray tune")
    cfg = cfg.replace(**{"ray.use_gpu": "true" if gpus_per_worker > 0 else "false"})
    spec = make_spec(cfg, space, gpus_per_worker=gpus_per_worker, **kw)
    return run_sweep(spec, tracking_uri=tracking_uri, experiment=experiment, verbose=verbose)


def cmd_tune(a) -> int:
    from .sweep import check_export_path, export_recipe, print_summary

    if a.export:
        check_export_path(a.export)  # before the sweep, not after it
    res = sweep_config(base_config(a), a.space, name=a.name, storage=a.storage, num_samples=a.num_samples,
                       scheduler=a.scheduler, search=a.search, metric=a.metric, mode=a.mode,
                       grace_period=a.grace_period, reduction_factor=a.reduction_factor, grid_points=a.grid_points,
                       gpus_per_worker=a.gpus_per_worker, max_concurrent=a.max_concurrent, seed=a.seed,
                       tracking_uri=a.tracking_uri, experiment=a.experiment, verbose=0 if a.quiet else 1)
    print_summary(res, res.spec.metric)
    if a.export:
        if res.best is None:
            raise ValueError("no trial finished with a finite metric: nothing to export")
        p = export_recipe(res.best_config, a.export, res.spec, res.best)
        print(f"sslray tune: best config written to {p}; run it with: sslray pretrain --recipe {p}")
    print(f"sslray tune: MLflow parent run {res.parent_run_id} in {res.tracking_uri}")
    return 0
