"""What one Tune trial runs: a Ray Train run (TorchTrainer, Train V2) of the ordinary training loop.

The trial function is a thin driver inside the trial actor. It builds the trial's config, then a
TorchTrainer whose RunConfig carries ``EpochReportCallback``: every per-epoch ``ray.train.report`` of
rank 0 (epoch, loss, lr, images_per_sec, knn_top1, knn_top5, ...) becomes a Tune result, so the
scheduler stops trials on the same metrics ``sslray pretrain`` logs. Step-level reports inside an
epoch (``"partial": 1``, from ``train.report_every_steps`` / ``train.checkpoint_every_steps``) still
save their Train checkpoints but are not Tune results: they carry no epoch metric, and Tune stops the
whole sweep on a result without the metric it schedules on. Nothing here writes to MLflow; the sweep
driver does (sqlite allows one writer).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from ..config import Config, from_dict
from ..storage import join
from .space import trial_config

TRAIN_DIR = "train"  # <storage>/<sweep>/train/<trial_id>: each trial's Ray Train run and checkpoints


def is_tune_result(metrics: list[dict]) -> bool:
    """Whether a Train report (one metrics dict per worker, rank 0 first) is an epoch result for Tune:
    not a step-level report from inside an epoch."""
    return bool(metrics) and not metrics[0].get("partial")


@functools.cache
def epoch_report_callback_class() -> type:
    """``EpochReportCallback``, built on first use so that importing this module does not import Ray."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReportCallback(TuneReportCallback):
        """``TuneReportCallback`` that passes epoch reports on to Tune and skips step-level ones."""

        def after_report(self, run_context, metrics, checkpoint):
            if is_tune_result(metrics):
                super().after_report(run_context, metrics, checkpoint)

    EpochReportCallback.__module__, EpochReportCallback.__qualname__ = __name__, "EpochReportCallback"
    return EpochReportCallback


def __getattr__(name: str):
    # ``sslray.tune.trial.EpochReportCallback``: the name pickles look the class up by.
    if name == "EpochReportCallback":
        return epoch_report_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trial_train_name(trial_id: str) -> str:
    return f"trial_{trial_id}"


def run_trial(config: Mapping[str, Any], base: dict, sweep_dir: str, gpus_per_worker: float,
              train_fn: str = "", forced: Mapping[str, Any] | None = None) -> None:
    """Tune function trainable. A restarted trial (resumed sweep) refits the same Train run name, and
    Train V2 resumes it from its latest checkpoint, so finished epochs are not trained twice.
    ``train_fn`` ("module:function") replaces the loop's ``train_func`` as the workers' entry point;
    ``forced`` are the keys the sweep sets on every trial (``SweepSpec.forced``)."""
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..raytrain.loop import train_func

    cfg: Config = trial_config(from_dict(base), config, forced)
    use_gpu = gpus_per_worker > 0
    per_worker = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    trial_id = ray.tune.get_context().get_trial_id()
    if train_fn:
        import importlib

        module, _, name = train_fn.partition(":")
        train_func = getattr(importlib.import_module(module), name)
    from ..raytrain.methods import import_plugins
    from ..raytrain.trainer import worker_runtime_env

    import_plugins(cfg.method.plugins)  # here first: a missing module names the key, and its folder goes to the workers
    renv = worker_runtime_env(cfg)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg.to_dict()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=trial_train_name(trial_id),
            storage_path=join(sweep_dir, TRAIN_DIR),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
            failure_config=FailureConfig(max_failures=0),  # a NaN or an OOM ends the trial, not the sweep
            callbacks=[epoch_report_callback_class()()],
            **({"worker_runtime_env": renv} if renv else {}),
        ),
    )
    trainer.fit()


def failure_reason(text: str) -> str:
    """One line saying why a trial failed, from the error text Tune keeps (a traceback that wraps
    the worker's traceback): non-finite loss, out of memory, or the innermost exception line."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "NonFiniteLossError" in ln:
            return "non-finite loss: " + ln.split("NonFiniteLossError:", 1)[-1].strip()
    for ln in reversed(lines):
        low = ln.lower()
        if "outofmemoryerror" in low or "out of memory" in low:
            return "out of memory: " + ln[:300]
    for ln in reversed(lines):
        # The innermost "SomeError: message" line of the last traceback.
        head = ln.split(":", 1)[0]
        if head and head.endswith(("Error", "Exception")) and " " not in head:
            return ln[:300]
    return lines[-1][:300] if lines else "unknown error"
