"""The Ray shell around the loop: TorchTrainer (Train V2) + a driver-side MLflow callback."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import Config, dump_yaml, flatten
from ..tracking import Tracker, numeric, resolve_uri

try:  # Ray Train V2 driver callbacks run in the train controller, never on the workers.
    from ray.train import UserCallback as _UserCallback
except ImportError:  # pragma: no cover - older Ray
    from ray.train.v2.api.callback import UserCallback as _UserCallback

FAMILY_TAG = "sslray.family"


class MLflowReportCallback(_UserCallback):
    """Logs rank 0's per-epoch metrics to one MLflow run as each ``ray.train.report`` lands.

    It runs in the Train controller (one process), so sqlite sees a single writer.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._tracker: Optional[Tracker] = None

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if not metrics:
            return
        m = metrics[0]
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri, self.run_id)
        self._tracker.log_metrics(numeric(m), step=int(m.get("epoch", 0)))
        if checkpoint is not None:
            self._tracker.set_tags({"sslray.last_checkpoint": checkpoint.path})


def resolve_use_gpu(cfg: Config) -> bool:
    import ray

    mode = str(cfg.ray.use_gpu).lower()
    if mode in ("true", "1", "yes"):
        return True
    if mode in ("false", "0", "no"):
        return False
    return ray.cluster_resources().get("GPU", 0) >= 1


def run_name(cfg: Config) -> str:
    data = Path(cfg.data.train).stem
    return cfg.tracking.run_name or f"{cfg.method.name}-{cfg.model.backbone}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class PretrainResult:
    run_id: str
    tracking_uri: str
    checkpoint: Optional[str]  # folder holding state.pt
    metrics: dict[str, Any]
    name: str
    storage: str


def ensure_ray(address: Optional[str] = None) -> None:
    import ray

    if not ray.is_initialized():
        # The dashboard also serves the state API that Train's placement-group cleaner polls.
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=True, configure_logging=False)


def pretrain(cfg: Config, tracker: Optional[Tracker] = None) -> PretrainResult:
    """Fit ``cfg`` with Ray Train; log params, config, per-epoch metrics and curves to MLflow."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .. import plots
    from .loop import train_func
    from .methods import METHODS

    ensure_ray()
    use_gpu = resolve_use_gpu(cfg)
    name = cfg.ray.name or run_name(cfg)
    storage = cfg.ray.storage if "://" in cfg.ray.storage else str(Path(cfg.ray.storage).resolve())
    uri = resolve_uri(cfg.tracking.tracking_uri or None)
    family = getattr(METHODS.get(cfg.method.name), "family", None)
    if tracker is None:
        tracker = Tracker.start(uri, cfg.tracking.experiment, name, tags={
            "sslray.method": cfg.method.name, "sslray.backbone": cfg.model.backbone,
            "sslray.dataset": Path(cfg.data.train).stem, **({FAMILY_TAG: family} if family else {})})
    tracker.log_params({**flatten(cfg), "derived.use_gpu": use_gpu, "derived.storage_name": name})
    tracker.log_text(dump_yaml(cfg), "config.yaml")

    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg.to_dict()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=[MLflowReportCallback(uri, tracker.run_id)],
        ),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
    except BaseException:
        tracker.end("FAILED")
        raise
    wall = time.time() - t0
    tracker.log_metrics({"train_wall_seconds": wall})
    series = {k: tracker.history(k) for k in ("loss", "knn_top1", "images_per_sec")}
    fig = plots.curves(series, title=name)
    tracker.log_figure(fig, "curves.png")
    plots.close(fig)
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    if ckpt:
        tracker.set_tags({"sslray.checkpoint": ckpt})
    metrics = dict(result.metrics or {})
    return PretrainResult(tracker.run_id, uri, ckpt, metrics, name, storage)
