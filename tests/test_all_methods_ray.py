"""Every registered method runs one epoch through `sslray pretrain` with 2 Ray workers on a real
CIFAR-10 subset, from its own CIFAR recipe shrunk to tiny sizes, and leaves a finished MLflow run with
its per-epoch loss, kNN monitor and online probe metrics.

Tiny on purpose (2 CPU cores in CI): the sizes of tests/test_methods.py (small backbone, shrunk
queues, prototypes and decoders), 2 steps of 16 images, a 64-image val split, no offline probe.
"""

from __future__ import annotations

import pytest

from sslray.cli import main
from sslray.raytrain.methods import METHODS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EXPERIMENT = "all-methods"


def _overrides(name: str) -> list[str]:
    from test_methods import EXTRA, PARAMS, TINY  # the registry-wide tiny sizes, kept in one place

    tiny = {**TINY, **EXTRA.get(name, {}), **{f"method.params.{k}": v for k, v in PARAMS.get(name, {}).items()}}
    tiny.update({"data.batch_size": 16, "data.train_subset": 128, "data.val_subset": 64, "data.knn_bank": 128,
                 "data.loader_workers": 1, "data.decode_res": 32, "train.epochs": 1, "train.max_steps_per_epoch": 2,
                 "train.knn_every": 1, "train.log_every": 0, "optim.warmup_epochs": 0, "ray.num_to_keep": 1,
                 "monitor.pictures": False})
    return [f"{k}={v}" for k, v in tiny.items()]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("all_methods")
    return root, f"sqlite:///{root / 'mlflow.db'}"


@pytest.mark.parametrize("name", METHODS.names())
def test_method_runs_an_epoch_on_two_ray_workers_and_logs_to_mlflow(name, ray_cluster, cifar_small, store):
    from mlflow.tracking import MlflowClient

    root, uri = store
    rc = main(["pretrain", "--recipe", f"{name}_cifar10", "--data", cifar_small["train"], "--val",
               cifar_small["test"], "--workers", "2", "--gpu", "false", "--no-probe", "--experiment", EXPERIMENT,
               "--tracking-uri", uri, "--storage", str(root / "runs"), "--name", f"all-{name}", *_overrides(name)])
    assert rc == 0, f"sslray pretrain --recipe {name}_cifar10 failed"

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], f"params.`method.name` = '{name}'")
    assert len(runs) == 1, f"{name}: expected one MLflow run, found {len(runs)}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["ray.num_workers"] == "2" and run.data.tags["sslray.method"] == name
    hist = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in hist] == [1], f"{name}: per-epoch loss history {[(m.step, m.value) for m in hist]}"
    assert hist[0].value == hist[0].value, f"{name}: NaN loss"  # noqa: PLR0124
    for key in ("knn_top1", "online_probe_top1", "online_probe_train_top1"):
        assert 0.0 <= run.data.metrics[key] <= 1.0, key
