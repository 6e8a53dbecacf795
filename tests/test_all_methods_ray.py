"""Every registered method runs one epoch through `sslray pretrain` with 2 Ray workers on a real
CIFAR-10 subset, from its own CIFAR recipe shrunk to tiny sizes, and leaves a finished MLflow run with
its per-epoch loss, kNN monitor and online probe metrics.

Tiny on purpose (2 CPU cores in CI): ``conftest_runs.tiny_overrides``, the sizes of
tests/test_methods.py (small backbone, shrunk queues, prototypes and decoders), 2 steps of 16 images, a
64-image val split, no offline probe. The methods of the session's shared runs (``conftest_runs``:
the same command at two epochs, with the probe and pictures) are checked on those runs instead of run twice.
"""

from __future__ import annotations

import pytest

from sslray.cli import main
from sslray.raytrain.methods import METHODS

pytest_plugins = ["conftest_runs"]
pytestmark = [pytest.mark.ray, pytest.mark.slow]

EXPERIMENT = "all-methods"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("all_methods")
    return root, f"sqlite:///{root / 'mlflow.db'}"


@pytest.mark.parametrize("name", METHODS.names())
def test_method_runs_an_epoch_on_two_ray_workers_and_logs_to_mlflow(name, ray_cluster, cifar_small, store, request):
    from conftest_runs import EPOCHS, tiny_overrides, tiny_run_specs
    from mlflow.tracking import MlflowClient

    if name in {m for m, _ in tiny_run_specs()}:
        # The same command (this recipe at the same size; two epochs, probe and pictures on) already ran for the
        # session's shared runs that `sslray compare` and the UI test read: check that run.
        shared = request.getfixturevalue("tiny_runs")
        uri, experiment, epochs = shared.uri, shared.experiment, EPOCHS
    else:
        root, uri = store
        experiment, epochs = EXPERIMENT, 1
        rc = main(["pretrain", "--recipe", f"{name}_cifar10", "--data", cifar_small["train"], "--val",
                   cifar_small["test"], "--workers", "2", "--gpu", "false", "--no-probe", "--experiment", experiment,
                   "--tracking-uri", uri, "--storage", str(root / "runs"), "--name", f"all-{name}",
                   *tiny_overrides(name)])
        assert rc == 0, f"sslray pretrain --recipe {name}_cifar10 failed"

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"params.`method.name` = '{name}'")
    assert len(runs) == 1, f"{name}: expected one MLflow run, found {len(runs)}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["ray.num_workers"] == "2" and run.data.tags["sslray.method"] == name
    hist = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in hist] == list(range(1, epochs + 1)), \
        f"{name}: per-epoch loss history {[(m.step, m.value) for m in hist]}"
    assert hist[0].value == hist[0].value, f"{name}: NaN loss"  # noqa: PLR0124
    for key in ("knn_top1", "online_probe_top1", "online_probe_train_top1"):
        assert 0.0 <= run.data.metrics[key] <= 1.0, key
