"""The Ray shell around the loop: TorchTrainer (Train V2) + a driver-side MLflow callback."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import Config, dump_yaml, flatten
from ..rayhead import local_head, stale_message
from ..storage import RUN_FILE, checkpoint_uri, exists, join
from ..tbmirror import TB_TAG, run_logdir
from ..tracking import Tracker, local_store, param_text, resolve_uri, same_store
from .reporting import MLflowReportCallback, log_missing_pictures
from .runfolder import (StorageError, check_remote_name, check_storage, check_storage_on_nodes, move_aside,
                        read_run_file, remove_if_empty, run_location, write_run_file)

FAMILY_TAG = "sslray.family"


def resolve_use_gpu(cfg: Config) -> bool:
    import ray

    mode = str(cfg.ray.use_gpu).lower()
    if mode in ("true", "1", "yes"):
        return True
    if mode in ("false", "0", "no"):
        return False
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return True
    if not own_instance():
        # An autoscaling cluster (cluster/*.yaml) starts its GPU nodes for the workers that ask for GPUs:
        # when the job starts there may be none yet, and "auto" would then train on CPU.
        print("sslray: WARNING: ray.use_gpu=auto found no GPU in the cluster: training on CPU workers. On an "
              "autoscaling cluster whose GPU nodes start at zero, pass --gpu true (the workers then wait for them)")
    return False


@dataclass
class PretrainResult:
    run_id: str
    tracking_uri: str
    checkpoint: Optional[str]  # folder holding state.pt
    metrics: dict[str, Any]
    name: str
    storage: str


def check_data(cfg: Config):
    """Fail before Ray starts on a dataset that is not given or not on this machine, when the workers
    will run here (a Ray instance this process starts). A cluster's workers may read files this
    machine does not have (node-local copies), so there a missing path is only reported. Data that is
    here gets the workers' own header checks (``data.plan_data``: readable files, class lists, labels,
    batch against workers and images) and its ``DataPlan`` is returned (else None)."""
    import ray

    from ..datasets.loader import DataError, square_note
    from .data import plan_data

    if not cfg.data.train:
        raise DataError("data.train: no dataset given (expected a .beton written by `sslray convert`, or an "
                        "ImageFolder directory)")
    missing = [f"{key}={path}" for key, path in (("data.train", cfg.data.train), ("data.val", cfg.data.val))
               if path and not os.path.exists(path)]
    if not missing:
        plan = plan_data(cfg, cfg.ray.num_workers, check_batch=not cfg.data.auto_batch)
        note = square_note(plan.train_info, plan.val_info)
        if note:
            print(f"sslray: note: {note}")
        return plan
    head = local_head()  # a dead head's file: ensure_ray starts a local instance, so the workers run here too
    here = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS") and (head is None or head.dead)
    if here:
        raise DataError(f"{', '.join(missing)}: no such file or directory on this machine, where the workers run; "
                        f"convert it first with `sslray convert SRC DEST`")
    print(f"sslray: note: {', '.join(missing)} not found on this machine; the cluster's workers must have it")
    return None


# Ray Train starts a PreemptionWatcher actor with every worker group, to notice nodes an autoscaler is
# draining. A Ray instance this process starts for itself is one machine that nothing drains: there the
# watcher is one more Python process per run, and its constructor makes Ray print a core-worker "E"
# line into every run's log. Train's controller reads this from the driver's environment.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
_OWN_INSTANCE = [False]  # whether ensure_ray started this process's Ray itself (one machine, nothing to scale)


def log_wall_seconds(tracker: Tracker, seconds: float) -> None:
    """``train_wall_seconds``: the training time of every ``fit()`` of the run so far, interrupted and
    failed ones included (a resumed run logged only its last one and looked faster than it was). Best
    effort when training failed: the failure is what the user must see."""
    try:
        before = max((v for _, v in tracker.history("train_wall_seconds")), default=0.0)
        tracker.log_metrics({"train_wall_seconds": before + seconds})
    except Exception as e:  # noqa: BLE001 - an MLflow outage must not hide why training ended
        print(f"sslray: WARNING: train_wall_seconds could not be logged ({type(e).__name__}: {e})")


@contextmanager
def sigint_seen():
    """Yields a function telling whether SIGINT reached this process inside the block, whatever handler
    took it (Ray Train installs its own during ``fit()`` and leaves it behind; the previous handler is
    put back). Uses the interpreter's wakeup fd, written for every signal a Python handler catches."""
    import signal
    import socket
    import threading

    if threading.current_thread() is not threading.main_thread():  # a Tune trial: no signals here
        yield lambda: False
        return
    seen: list[int] = []
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    handler = signal.getsignal(signal.SIGINT)
    old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)

    def drain() -> bool:
        try:
            while True:
                data = r.recv(512)
                if not data:
                    break
                seen.extend(data)
        except (BlockingIOError, OSError):
            pass
        return signal.SIGINT in seen

    try:
        yield drain
    finally:
        drain()
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGINT, handler)
        r.close()
        w.close()


def own_instance() -> bool:
    """Whether this process started its Ray itself (one machine: what it has now is all there is); a
    cluster it joined may start nodes on demand."""
    return _OWN_INSTANCE[0]


def ensure_ray(address: Optional[str] = None) -> None:
    """Connect to ``address``, ``RAY_ADDRESS`` or the head a plain ``ray.init()`` finds, else start a
    local instance (without Train's PreemptionWatcher unless the environment asks for it)."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or None
    head = local_head() if target is None else None
    if head is not None and head.dead:
        # Joining would wait forever on the dead GCS; what the user gets without the file is a local instance.
        print(f"sslray: WARNING: {stale_message(head)} Starting a local Ray instance instead.")
        target = "local"
    if target == "local" or (target is None and head is None):
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        _OWN_INSTANCE[0] = True
    # The dashboard also serves the state API that Train's placement-group cleaner polls.
    ray.init(address=target, log_to_driver=True, configure_logging=False)


def plugin_folders(modules) -> list[str]:
    """The folders this process imported the ``method.plugins`` modules from (the folder holding each
    one's top-level package or file), leaving out the interpreter's own and installed ones (the standard
    library, ``site-packages``): every node's environment has those, or none does."""
    import sys
    import sysconfig

    installed = {str(Path(p).absolute()) for k, p in sysconfig.get_paths().items() if "lib" in k}
    folders: list[str] = []
    for name in modules:
        top = sys.modules.get(name.split(".")[0])
        if top is None:
            continue
        if getattr(top, "__file__", None):
            f = Path(top.__file__).absolute()
            found = [f.parent.parent if f.name == "__init__.py" else f.parent]
        else:  # a namespace package: every folder it spans
            found = [Path(p).absolute().parent for p in getattr(top, "__path__", [])]
        folders += [str(d) for d in found if d.name not in ("site-packages", "dist-packages")
                    and str(d) not in installed and str(d) not in folders]
    return folders


def worker_runtime_env(plugins) -> dict:
    """The Train workers' runtime env: empty unless the ``method.plugins`` modules ``plugins`` (a run's
    config or its list) came from folders outside an
    installed environment. Those go first on the workers' PYTHONPATH, so a plugin this process found
    through PYTHONPATH, its cwd or ``sys.path`` is found by workers on this machine (also when they
    belong to a Ray instance started from another shell) and on nodes that mount the folder at the same
    path. Nodes without it need the plugin installed or shipped with the job (docs/methods.md)."""
    folders = plugin_folders(plugins.method.plugins if isinstance(plugins, Config) else plugins)
    if not folders:
        return {}
    import ray

    # Ray merges env_vars key by key: a PYTHONPATH set here would hide the job's own, so it is repeated;
    # ${PYTHONPATH} is the node's, expanded where each worker starts.
    job = ((ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}).get("PYTHONPATH", "")
    return {"env_vars": {"PYTHONPATH": os.pathsep.join([*folders, *([job] if job else []), "${PYTHONPATH}"])}}


def log_resumed_config(tracker: Tracker, cfg: Config) -> dict[str, tuple[str, str]]:
    """A resume with other settings (another batch size, more epochs): MLflow params cannot change, so
    the keys that differ from the logged ones go to the ``sslray.resumed_with`` tag (``key=new (was
    old)``, latest resume) and the resumed config to ``config-resume-<time>.yaml``; returns the changes."""
    logged = tracker.client.get_run(tracker.run_id).data.params
    same_run = {"ray.name", "tracking.run_name"}  # a first launch may have derived the name the resume names
    changed = {k: (param_text(v), logged[k]) for k, v in flatten(cfg).items()
               if k in logged and k not in same_run and param_text(v) != logged[k]}
    if changed:
        text = "; ".join(f"{k}={new} (was {old})" for k, (new, old) in sorted(changed.items()))
        tracker.set_tags({"sslray.resumed_with": text[:5000]})
        tracker.log_text(dump_yaml(cfg), f"config-resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        print(f"sslray: resumed with other settings than the run's params: {text}")
    return changed


def _open_run(cfg: Config, tracker: Optional[Tracker], name: str, run_dir: str) -> tuple[Tracker, bool, str]:
    """Ray up, the GPU question settled, and the MLflow run: the one ``run_dir`` names (a resume) or a
    new one, written into ``run_dir``. Returns ``(tracker, use_gpu, tracking URI)``."""
    from .methods import METHODS

    uri = resolve_uri(cfg.tracking.tracking_uri or None)
    previous = read_run_file(run_dir)
    before = previous.get("tracking_uri") if previous and tracker is None else None
    store = local_store(before) if before is not None else None
    gone = store is not None and not os.path.exists(store)  # e.g. a job's temporary working dir
    if before is not None and same_store(before, uri):
        uri = before  # the run's own spelling of the same store: resume into it
    elif gone:  # there is no run left to resume into
        print(f"sslray: WARNING: run {name} logged to {before}, which no longer exists; its resumed training "
              f"logs to a new MLflow run in {uri}")
    elif before is not None:
        # A resume from another folder (the default sqlite:///mlflow.db is per folder) or with another
        # MLFLOW_TRACKING_URI would start a second MLflow run and overwrite the only link to the first.
        raise StorageError(f"run {name} in {run_dir} logs to MLflow run {previous.get('run_id')} in "
                           f"{previous['tracking_uri']}, but this command's tracking URI is {uri}: pass "
                           f"--tracking-uri {previous['tracking_uri']} to resume it there, or --restart to start "
                           f"over (or delete {join(run_dir, RUN_FILE)} to log the resumed run to a new MLflow run)")
    ensure_ray()
    use_gpu = resolve_use_gpu(cfg)
    check_storage_on_nodes(run_dir, cfg.ray.cpus_per_worker, use_gpu)
    family = getattr(METHODS.get(cfg.method.name), "family", None)
    if tracker is None and previous and previous.get("tracking_uri") == uri:
        tracker = Tracker(uri, previous["run_id"])
        tracker.client.update_run(tracker.run_id, status="RUNNING")
        resume_mirror(tracker, cfg, name)
        print(f"sslray: resuming run {name} (MLflow run {tracker.run_id}) from its latest checkpoint in {run_dir}")
        log_resumed_config(tracker, cfg)
    else:
        if tracker is None:
            tracker = Tracker.start(uri, cfg.tracking.experiment, name, tags={
                "sslray.method": cfg.method.name, "sslray.backbone": cfg.model.backbone,
                "sslray.dataset": Path(cfg.data.train).stem, **({FAMILY_TAG: family} if family else {}),
                **({TB_TAG: run_logdir(cfg.tracking.tensorboard, name)} if cfg.tracking.tensorboard else {})})
        tracker.log_params({**flatten(cfg), "derived.use_gpu": use_gpu, "derived.storage_name": name})
        tracker.log_text(dump_yaml(cfg), "config.yaml")
        write_run_file(run_dir, {"run_id": tracker.run_id, "tracking_uri": uri, "name": name})
    return tracker, use_gpu, uri


def resume_mirror(tracker: Tracker, cfg: Config, name: str) -> None:
    """A resumed run and ``tracking.tensorboard``: a run that did not mirror starts to; one that does
    keeps its folder (one run's curves are not split over two), with a note if the key names another."""
    if not cfg.tracking.tensorboard:
        return
    want, have = run_logdir(cfg.tracking.tensorboard, name), tracker.mirror()
    if have is None:
        tracker.mirror_to(want)
    elif have.logdir != want:
        print(f"sslray: note: run {name} mirrors to TensorBoard in {have.logdir} since it started; it goes on "
              f"there (tracking.tensorboard now points at {want})")


def pretrain(cfg: Config, tracker: Optional[Tracker] = None, restart: bool = False) -> PretrainResult:
    """Fit ``cfg`` with Ray Train; log params, config, per-epoch metrics and curves to MLflow.

    Running again with the same ``ray.name`` and ``ray.storage`` resumes from the latest checkpoint
    and keeps writing to the same MLflow run; ``restart=True`` moves the old run aside first.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .. import plots
    from .loop import train_func
    from .session import PICTURES_DIR
    from .methods import check_method_config

    name, storage, run_dir = run_location(cfg)
    check_remote_name(storage, name)
    check_data(cfg)  # a typo in --data (or a key below) moves nothing aside and makes no run folder
    check_method_config(cfg)  # a method.params or registry-name typo here, not ~80 s later in the workers
    if restart:
        try:
            old = move_aside(run_dir)
        except OSError as e:  # an unreachable bucket, bad credentials, a copy that came out short
            raise StorageError(f"--restart: the previous run in {run_dir} could not be moved aside ({e}); "
                               "nothing was deleted") from None
        if old:
            print(f"sslray: --restart: the previous run was moved to {old}")
    try:
        made_here = not exists(run_dir)
    except Exception:  # noqa: BLE001 - an unreachable store: check_storage names it next
        made_here = False
    check_storage(storage, name)  # fail before Ray, data or models are touched
    try:
        tracker, use_gpu, uri = _open_run(cfg, tracker, name, run_dir)
    except BaseException:
        if made_here:  # Ray or MLflow could not start: no empty run folder is left behind
            remove_if_empty(run_dir)
        raise
    report = MLflowReportCallback(uri, tracker.run_id, f"{run_dir}/{PICTURES_DIR}", storage)
    renv = worker_runtime_env(cfg)  # only plugin runs set it: other runs keep the job's runtime env untouched
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg.to_dict(), "pictures_dir": f"{run_dir}/{PICTURES_DIR}"},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
                                     placement_strategy=cfg.ray.placement_strategy),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=[report],
            **({"worker_runtime_env": renv} if renv else {}),
        ),
    )
    t0 = time.time()
    try:
        with sigint_seen() as interrupted:
            result = trainer.fit()
    except BaseException as e:
        seconds = time.time() - t0
        # Ctrl-C: Ray's own SIGINT handler aborts the run (its workers may die of the same signal first),
        # so fit() raises an abort or worker error, or exits; it is an interrupt all the same. The run is
        # ended first: a second Ctrl-C during the logging below must not leave it RUNNING.
        stopped = isinstance(e, KeyboardInterrupt) or interrupted()
        tracker.end("KILLED" if stopped else "FAILED")
        log_wall_seconds(tracker, seconds)  # an interrupted or failed segment trained too
        if stopped:
            print(f"sslray: interrupted; its checkpoints are kept in {run_dir}; run the same command again "
                  f"(same --name {name}) to resume")
            raise KeyboardInterrupt from None
        print(f"sslray: run {name} failed (max_failures={cfg.ray.max_failures}); its checkpoints are kept in "
              f"{run_dir}; run the same command again to resume from the latest one")
        raise
    wall = time.time() - t0
    report.log_pending(tracker)  # what the callback could not log (before the curves are drawn from the run)
    log_wall_seconds(tracker, wall)
    series = {k: tracker.history(k) for k in ("loss", "knn_top1", "images_per_sec")}
    fig = plots.curves(series, title=name)
    tracker.log_figure(fig, "curves.png")
    plots.close(fig)
    log_missing_pictures(tracker, f"{run_dir}/{PICTURES_DIR}")  # what the last report's callback missed
    ckpt = checkpoint_uri(result.checkpoint, storage)  # s3://... for object storage, not pyarrow's bare path
    if ckpt:
        tracker.set_tags({"sslray.checkpoint": ckpt})
    metrics = dict(result.metrics or {})
    return PretrainResult(tracker.run_id, uri, ckpt, metrics, name, storage)
