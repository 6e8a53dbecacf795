"""The sweep driver: Tuner over trial functions that each fit a TorchTrainer, MLflow parent + children.

``run_sweep(spec, space)`` starts a sweep, or resumes it when ``<storage>/<name>`` holds one
(``Tuner.can_restore``): finished trials stay finished, unfinished ones restart and their Train runs
resume from their last checkpoint. Everything that talks to MLflow runs here, in the driver.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, dump_yaml, effective_lr, from_dict
from ..storage import join, list_files, read_text, write_text
from ..tracking import SWEEP_PARENT_TAG, Tracker, resolve_uri
from .space import RECIPE_KEY, Dist, describe, grid_size, to_param_space, trial_config
from .trial import run_trial

META_FILE = "sslray_sweep.json"  # the sweep's spec + parent run id, read back on resume
SCHEDULERS = ("asha", "median", "pbt", "fifo")
SEARCHES = ("random", "grid", "optuna")
# The trial function only waits on its TorchTrainer: it asks Tune for memory, not a CPU, so every
# CPU/GPU of the cluster goes to training workers (a placement group bundle cannot be all zeros).
TRIAL_DRIVER_MEMORY = 256 * 1024**2
PBT_UNSUPPORTED = (
    "--scheduler pbt is not supported yet: with Ray 2.60 Train V2 trials, TuneReportCallback hands Tune "
    "metrics but no Tune checkpoints, so PBT would skip every exploit/explore step and run as FIFO. "
    "Use --scheduler asha or median (docs/tune.md)")


@dataclass
class SweepSpec:
    base: dict  # Config.to_dict() every trial starts from (train.epochs = max_epochs)
    space: dict  # key -> [kind, args]
    name: str
    storage: str
    num_samples: int = 8
    scheduler: str = "asha"
    search: str = "random"
    metric: str = "knn_top1"
    mode: str = "max"
    max_epochs: int = 10
    grace_period: int = 1
    reduction_factor: float = 2.0
    grid_points: int = 3
    gpus_per_worker: float = 0.0
    max_concurrent: int = 0  # 0: from cluster resources and trial size
    seed: int = 0
    train_fn: str = ""  # "module:function" the workers run instead of the loop's train_func ("": the loop's)
    # Keys every trial runs with whatever its recipe says (a sampled ``recipe`` replaces the base):
    # the kNN monitor every epoch when the scheduler reads a kNN metric.
    forced: dict = field(default_factory=dict)

    @property
    def dists(self) -> dict[str, Dist]:
        return {k: Dist(kind, tuple(args)) for k, (kind, args) in self.space.items()}

    @property
    def sweep_dir(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    def total_trials(self) -> int:
        """How many trials Tune runs: ``num_samples`` times the grid (every key for ``--search grid``,
        the ``grid(...)`` keys for random); Optuna samples grid keys as a choice, so ``num_samples``."""
        d = self.dists
        if self.search == "optuna":
            return self.num_samples
        if self.search == "grid":
            return self.num_samples * grid_size(d, self.grid_points)
        grids = {k: v for k, v in d.items() if v.kind == "grid"}
        return self.num_samples * (grid_size(grids) if grids else 1)


def make_spec(base: Config, space: Mapping[str, Dist], **kw) -> SweepSpec:
    for flag, key, low, strict in (("--num-samples", "num_samples", 1, False),
                                   ("--grid-points", "grid_points", 1, False),
                                   ("--reduction-factor", "reduction_factor", 1, True),
                                   ("--max-concurrent", "max_concurrent", 0, False)):
        v = kw.get(key)
        if v is not None and (v <= low if strict else v < low):
            raise ConfigError(f"{flag} must be {'above' if strict else 'at least'} {low}, got {v}")
    gpus = float(kw.get("gpus_per_worker") or 0.0)
    if gpus < 0:
        raise ConfigError(f"--gpus-per-worker must be at least 0, got {gpus:g}")
    if 0 < gpus < 1 and base.ray.num_workers > 1:
        # Ray packs the fractions of one trial onto one GPU, where its ranks' NCCL group refuses to start
        # ("Duplicate GPU detected"): every trial would fail.
        raise ConfigError(f"--gpus-per-worker {gpus:g} with {base.ray.num_workers} workers per trial would put "
                          f"several ranks of a trial on one GPU, which NCCL refuses; share GPUs between trials "
                          f"with --workers-per-trial 1, or give each worker whole GPUs")
    if kw.get("scheduler", "asha") not in SCHEDULERS:
        raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULERS)}")
    if kw.get("scheduler") == "pbt":
        raise ConfigError(PBT_UNSUPPORTED)
    if kw.get("search", "random") not in SEARCHES:
        raise ConfigError(f"--search must be one of {', '.join(SEARCHES)}")
    if kw.get("search") == "optuna":
        require_optuna()  # before the sweep's MLflow parent run exists
    if kw.get("mode", "max") not in ("max", "min"):
        raise ConfigError("--mode must be max or min")
    metric = kw.get("metric", "knn_top1")
    check_metric(metric, base)
    max_epochs = int(kw.get("max_epochs", base.train.epochs))
    grace = int(kw.get("grace_period", 1))
    if not 0 < grace <= max_epochs:
        raise ConfigError(f"--grace-period {grace} must be between 1 and --max-epochs {max_epochs}")
    # The scheduler reads the metric every epoch (Tune stops the sweep on an epoch result without it),
    # so the kNN monitor must run every epoch, also in trials that load a recipe of their own.
    forced = {"train.knn_every": 1} if metric.startswith("knn") else {}
    clash = sorted(set(forced) & set(space))
    if clash:
        sets = ", ".join(f"{k}={v}" for k, v in forced.items())
        raise ConfigError(f"--space {', '.join(clash)}: the sweep sets {sets} on every trial, because --metric "
                          f"{metric} is read every epoch; leave it out of --space")
    cfg = base.replace(**{"train.epochs": max_epochs, "tracking.run_name": "", "ray.name": "", **forced})
    return SweepSpec(base=cfg.to_dict(), space={k: [d.kind, list(d.args)] for k, d in space.items()}, forced=forced,
                     **kw)


def check_metric(metric: str, base: Config) -> None:
    """``--metric`` must be a per-epoch metric of the runs: a typo would otherwise end the sweep at the
    first epoch report (Tune's error), after the trials started and with the MLflow parent left KILLED."""
    import difflib

    from ..raytrain.loop import EPOCH_METRICS, VAL_METRICS

    if metric not in EPOCH_METRICS:
        near = difflib.get_close_matches(metric, sorted(EPOCH_METRICS), n=3)
        hint = f"did you mean {' or '.join(near)}? " if near else ""
        raise ConfigError(f"--metric {metric} is not a per-epoch metric of sslray runs; {hint}"
                          f"the probe metrics are {', '.join(VAL_METRICS)}; every name: docs/tune.md")
    if metric in VAL_METRICS and not base.data.val:
        raise ConfigError(f"--metric {metric} is measured on the val split: give --val")


def default_gpus_per_worker(who: str) -> float:
    """``--gpus-per-worker`` left out: 1 where the cluster has a GPU, else 0, said aloud on a cluster this
    process joined (an autoscaler's GPU nodes may not be up yet, and the trials would train on CPU)."""
    import ray

    from ..raytrain.trainer import ensure_ray, own_instance

    ensure_ray()
    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    if not gpus and not own_instance():
        print(f"{who}: WARNING: the cluster has no GPU now: the trials train on CPU workers. On an autoscaling "
              f"cluster whose GPU nodes start at zero, pass --gpus-per-worker 1 (the trials then wait for them)")
    return gpus


def max_concurrent_trials(resources: Mapping[str, float], workers: int, cpus_per_worker: float,
                          gpus_per_worker: float, total_trials: int | None = None, can_grow: bool = False) -> int:
    """How many trials fit the cluster at once: each needs ``workers`` x (CPUs, GPUs). More would
    only start trial drivers that wait for workers (and hold their memory). ``can_grow``: a cluster
    that may start nodes for waiting trials (an autoscaler whose worker groups start at zero): one
    that cannot hold a trial now is not refused; every trial may start and wait for its nodes."""
    fits = []
    for key, per in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker)):
        if per > 0:
            need = workers * per
            have = float(resources.get(key, 0))
            if have < need and can_grow:
                n = total_trials or 1
                print(f"sslray tune: one trial needs {need:g} {key} ({workers} worker(s) x {per:g}) and the cluster "
                      f"has {have:g} now; up to {n} trial(s) start and wait for an autoscaler's nodes "
                      f"(--max-concurrent sets how many). A cluster that does not autoscale never gets them: "
                      f"stop with Ctrl-C and give the trials fewer workers or CPUs")
                return n
            if have < need:
                raise ConfigError(f"one trial needs {need:g} {key} ({workers} worker(s) x {per:g}); "
                                  f"the cluster has {have:g}")
            fits.append(math.floor(have / need + 1e-9))
    n = min(fits) if fits else 1
    return max(1, min(n, total_trials) if total_trials else n)


def build_scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    if spec.scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=spec.max_epochs, grace_period=spec.grace_period,
                             reduction_factor=spec.reduction_factor)
    if spec.scheduler == "median":
        return MedianStoppingRule(time_attr="epoch", grace_period=spec.grace_period, min_samples_required=3)
    return FIFOScheduler()


def require_optuna() -> None:
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("--search optuna needs the optional package optuna: pip install 'sslray[tune]'")


def build_search(spec: SweepSpec, max_concurrent: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.search != "optuna":  # a SearchGenerator ignores TuneConfig.max_concurrent_trials: limit it here
        return BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent)
    require_optuna()
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(seed=spec.seed), max_concurrent=max_concurrent)


def param_space(spec: SweepSpec) -> dict:
    if spec.search == "optuna":  # Optuna samples every key itself: grid values become a categorical choice
        return to_param_space({k: Dist("choice", d.args) if d.kind == "grid" else d
                               for k, d in spec.dists.items()}, "random")
    return to_param_space(spec.dists, spec.search, spec.grid_points)


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def make_trainable(spec: SweepSpec):
    from ray import tune

    fn = tune.with_parameters(run_trial, base=spec.base, sweep_dir=spec.sweep_dir,
                              gpus_per_worker=spec.gpus_per_worker, train_fn=spec.train_fn, forced=spec.forced)
    return tune.with_resources(fn, {"memory": TRIAL_DRIVER_MEMORY})


@dataclass
class SweepResult:
    rows: list[dict]
    best: dict | None
    best_config: Config | None
    parent_run_id: str
    tracking_uri: str
    sweep_dir: str
    resumed: bool
    spec: SweepSpec
    results: Any = field(default=None, repr=False)  # Tune's ResultGrid


def saved_trial_statuses(sweep_dir: str) -> dict[str, str]:
    """Trial id -> status (PENDING, RUNNING, TERMINATED, ERROR) from the newest experiment state Tune
    saved in ``sweep_dir`` (what a resume starts from); {} while none is saved or it is mid-write."""
    files = list_files(sweep_dir, "experiment_state-*.json")
    if not files:
        return {}
    try:
        data = json.loads(read_text(join(sweep_dir, files[-1])) or "")
        return {s["trial_id"]: s["status"] for s in (json.loads(t[0]) for t in data["trial_data"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _meta_path(spec: SweepSpec) -> str:
    return join(spec.sweep_dir, META_FILE)


def run_sweep(spec: SweepSpec, tracking_uri: str | None = None, experiment: str = "sslray",
              verbose: int = 1) -> SweepResult:
    from ray import tune

    from ..raytrain.trainer import ensure_ray
    from .mlflow_callback import SWEEP_TAG, MLflowSweepCallback
    from .reaper import PlacementGroupReaper
    from .summary import log_summary, summarize

    ensure_ray()
    meta_text = read_text(_meta_path(spec))  # local, shared or object storage (s3://...)
    resumed = meta_text is not None and tune.Tuner.can_restore(spec.sweep_dir)
    if resumed:
        meta = json.loads(meta_text)
        stored = SweepSpec(**meta["spec"])
        if dataclasses.asdict(stored) != dataclasses.asdict(spec):
            print(f"sslray tune: resuming {spec.sweep_dir} with the settings it was started with "
                  f"(the command line differs; start a new --name to change them)")
        spec, uri, parent_id = stored, meta["tracking_uri"], meta["parent_run_id"]
        parent = Tracker(uri, parent_id)
        parent.client.update_run(parent_id, status="RUNNING")
        done = sum(s in ("TERMINATED", "ERROR") for s in saved_trial_statuses(spec.sweep_dir).values())
        print(f"sslray tune: resuming sweep {spec.name}: {done} of {spec.total_trials()} trial(s) already "
              f"finished are kept (MLflow parent run {parent_id})")
        tuner = tune.Tuner.restore(spec.sweep_dir, trainable=make_trainable(spec), resume_unfinished=True,
                                   resume_errored=False)
    else:
        import ray

        uri = resolve_uri(tracking_uri)
        total = spec.total_trials()
        base = from_dict(spec.base)
        from ..raytrain.trainer import own_instance

        limit = spec.max_concurrent or max_concurrent_trials(
            ray.cluster_resources(), base.ray.num_workers, base.ray.cpus_per_worker, spec.gpus_per_worker, total,
            can_grow=not own_instance())
        spec = dataclasses.replace(spec, max_concurrent=limit)
        parent = Tracker.start(uri, experiment, spec.name, tags={
            SWEEP_TAG: spec.name, SWEEP_PARENT_TAG: "true", "sslray.method": base.method.name,
            "sslray.backbone": base.model.backbone})
        parent.log_params({
            **{f"space.{k}": v for k, v in describe(spec.dists).items()},
            "tune.scheduler": spec.scheduler, "tune.search": spec.search, "tune.num_samples": spec.num_samples,
            "tune.total_trials": total, "tune.metric": spec.metric, "tune.mode": spec.mode,
            "tune.max_epochs": spec.max_epochs, "tune.grace_period": spec.grace_period,
            "tune.reduction_factor": spec.reduction_factor, "tune.workers_per_trial": base.ray.num_workers,
            "tune.gpus_per_worker": spec.gpus_per_worker, "tune.max_concurrent_trials": limit,
            "tune.sweep_dir": spec.sweep_dir, "tune.seed": spec.seed,
        })
        parent.log_text(dump_yaml(base), "base_config.yaml")
        parent.log_text(json.dumps(describe(spec.dists), indent=2), "space.json")
        write_text(_meta_path(spec), json.dumps({"spec": dataclasses.asdict(spec), "tracking_uri": uri,
                                                 "parent_run_id": parent.run_id}, indent=2))
        recipes = spec.space.get(RECIPE_KEY, [None, []])[1]  # a study: one recipe file per method
        what = ", ".join(Path(str(r)).stem for r in recipes) if recipes else base.method.name
        print(f"sslray tune: {total} trial(s) of {what}, at most {limit} at once, "
              f"{spec.scheduler} on {spec.metric} ({spec.mode}); MLflow parent run {parent.run_id}")
        tuner = tune.Tuner(
            make_trainable(spec),
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                scheduler=build_scheduler(spec), search_alg=build_search(spec, limit),
                trial_dirname_creator=trial_dirname),  # concurrency is limited by the search algorithm
            run_config=tune.RunConfig(
                name=spec.name, storage_path=spec.storage, verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=[MLflowSweepCallback(uri, experiment, parent.run_id, spec.name, spec.base,
                                               spec.max_epochs, spec.forced), PlacementGroupReaper()]),
        )
    try:
        grid = tuner.fit()
    except BaseException:
        parent.end("KILLED")
        raise
    rows, best = summarize(grid, spec)
    best_cfg = best_config(spec, best) if best else None
    log_summary(parent, spec, rows, best, best_cfg)
    parent.end("FINISHED")
    return SweepResult(rows, best, best_cfg, parent.run_id, parent.uri, spec.sweep_dir, resumed, spec, grid)


def best_config(spec: SweepSpec, best: Mapping[str, Any]) -> Config:
    """The best trial's full config, ready for ``sslray pretrain --recipe``."""
    return trial_config(from_dict(spec.base), best["config"], spec.forced)


EXPORT_MARK = "# Best trial "  # how an exported recipe starts: such a file may be replaced by the next export


def check_export_path(path: str) -> None:
    """``--export``, checked before the sweep: a recipe name `sslray pretrain --recipe` takes, not a folder,
    and not a file other than an earlier export (a hand-written recipe is not overwritten)."""
    p = Path(path)
    if p.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"--export {path}: a recipe file ends in .yaml or .yml (what sslray pretrain --recipe "
                          "reads)")
    if p.is_dir():
        raise ConfigError(f"--export {path} is a folder; give the recipe file to write")
    if p.exists():
        with open(p, errors="replace") as f:
            if not f.read(len(EXPORT_MARK)) == EXPORT_MARK:
                raise ConfigError(f"--export {path} exists and is not a recipe an earlier sweep exported; "
                                  "give another file name (it is left as it is)")


def export_recipe(cfg: Config, path: str, spec: SweepSpec, best: Mapping[str, Any]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = (f"{EXPORT_MARK}{best['trial_id']} of sweep {spec.name} ({spec.metric} = {best.get(spec.metric)}, "
              f"{best.get('epochs')} epochs).\n# Sampled: "
              + ", ".join(f"{k}={v}" for k, v in best["config"].items())
              + f"\n# optim.base_lr is per 256 images: effective lr = {effective_lr(cfg):.4g} at batch "
              f"{cfg.data.batch_size} ({cfg.optim.lr_scaling} scaling).\n"
              f"# Use: sslray pretrain --recipe {p.name} train.epochs=N\n")
    p.write_text(header + dump_yaml(cfg))
    return p


def print_summary(res: SweepResult, spec_metric: str) -> None:
    keys = sorted({k for r in res.rows for k in r["config"]})
    head = ["trial", "status", "epochs", spec_metric] + keys + ["reason"]
    print("  ".join(f"{h:>14s}" for h in head))
    for r in res.rows:
        vals = [r["trial_id"], r["status"], str(r["epochs"]), _fmt(r.get(spec_metric))]
        vals += [_fmt(r["config"].get(k)) for k in keys] + [r.get("reason", "")[:60]]
        print("  ".join(f"{v:>14s}" for v in vals))
    if res.best:
        print(f"\nbest trial {res.best['trial_id']}: {spec_metric} = {_fmt(res.best.get(spec_metric))}")
        for k, v in res.best["config"].items():
            print(f"  {k}: {v}")
        if res.best_config is not None:
            print(f"  (effective lr {effective_lr(res.best_config):.4g} at batch {res.best_config.data.batch_size})")
        ckpts = best_trial_dir(res)
        print(f"  its checkpoints: {ckpts}\n  its backbone: sslray export {ckpts} best-backbone/")


def best_trial_dir(res: SweepResult) -> str:
    """Where the best trial's Ray Train run keeps its checkpoints (``sslray export`` takes the folder)."""
    from .trial import TRAIN_DIR, trial_train_name

    return f"{res.sweep_dir.rstrip('/')}/{TRAIN_DIR}/{trial_train_name(res.best['trial_id'])}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


__all__ = ["SweepSpec", "export_recipe", "make_spec", "max_concurrent_trials", "run_sweep"]
