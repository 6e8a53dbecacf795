"""Every registered method trains on two DDP ranks of the real loop on a real CIFAR-10 subset, from
its own CIFAR recipe shrunk to tiny sizes, and reports per-epoch loss, kNN monitor and online probe
metrics that MLflow can take.

Tiny on purpose (2 CPU cores in CI): ``conftest_runs.tiny_overrides``, the sizes of
tests/test_methods.py (small backbone, shrunk queues, prototypes and decoders), 2 steps of 16 images, a
64-image val split, no offline probe.

The methods of the session's shared runs (``conftest_runs``: `sslray pretrain` on 2 Ray workers, two
epochs, probe and pictures on, logged to MLflow) are checked on those finished MLflow runs. The others
run the same per-worker loop in two gloo processes, one after another in the same pair: the Ray and
MLflow layers above the loop are the same for every method, and a Ray Train run per method would cost
~45 s of process start-up each on 2 cores.
"""

from __future__ import annotations

import pytest

from sslray.raytrain.methods import METHODS

pytest_plugins = ["conftest_runs"]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _ranks_main(rank: int, world: int, init: str, out: str, runs: dict):
    """One gloo rank: each method's loop in turn, its reports and checkpoint folders to ``out.<rank>``."""
    import json
    import os

    import torch
    import torch.distributed as dist

    from sslray.config import from_dict
    from sslray.raytrain.loop import train_loop
    from sslray.raytrain.session import LocalSession

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    done = {}
    try:
        for name, (cfg, ckpt) in runs.items():
            session = LocalSession(ckpt, "cpu", printer=lambda *a, **k: None)
            try:
                train_loop(from_dict(cfg), session)
                done[name] = {"history": session.history, "checkpoints": sorted(os.listdir(ckpt))}
            except Exception as e:  # noqa: BLE001 - the test names the method; both ranks fail alike
                done[name] = {"error": f"{type(e).__name__}: {e}"}
                break
    finally:
        with open(f"{out}.{rank}", "w") as f:
            json.dump(done, f, default=repr)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(cifar_small, tmp_path_factory) -> dict:
    """The methods without a shared Ray run, one epoch each, in one pair of gloo processes."""
    import json

    import torch.multiprocessing as mp
    from conftest_runs import tiny_overrides, tiny_run_specs

    from sslray.config import load_config

    root = tmp_path_factory.mktemp("all_methods")
    shared = {m for m, _ in tiny_run_specs()}
    runs = {}
    for name in METHODS.names():
        if name not in shared:
            cfg = load_config(f"{name}_cifar10", [f"data.train={cifar_small['train']}",
                                                  f"data.val={cifar_small['test']}", "ray.num_workers=2",
                                                  *tiny_overrides(name)])
            runs[name] = (cfg.to_dict(), str(root / name))
    out = str(root / "reports")
    mp.spawn(_ranks_main, args=(2, f"file://{root / 'rendezvous'}", out, runs), nprocs=2, join=True)
    return {rank: json.loads(open(f"{out}.{rank}").read()) for rank in range(2)}


def _check_metrics(name: str, metrics: dict) -> None:
    for key in ("knn_top1", "online_probe_top1", "online_probe_train_top1"):
        assert 0.0 <= metrics[key] <= 1.0, (name, key, metrics.get(key))


def _check_names(name: str, epoch_report: dict) -> None:
    """Every per-epoch metric a method reports is in EPOCH_METRICS (what `sslray tune --metric` accepts)."""
    from sslray.raytrain.loop import EPOCH_METRICS

    unknown = sorted(set(epoch_report) - EPOCH_METRICS - {"node_id"})
    assert not unknown, f"{name} reports {unknown}, missing from sslray.raytrain.loop.EPOCH_METRICS"


@pytest.mark.parametrize("name", METHODS.names())
def test_method_trains_on_two_ranks_and_reports_its_metrics(name, request):
    import math

    from conftest_runs import EPOCHS, tiny_run_specs
    from mlflow.tracking import MlflowClient

    if name not in {m for m, _ in tiny_run_specs()}:
        reports = request.getfixturevalue("ddp_runs")
        for rank in (0, 1):
            got = reports[rank].get(name)
            assert got is not None, f"{name}: rank {rank} never ran it (an earlier method failed: {reports[rank]})"
            assert "error" not in got, f"{name} failed on rank {rank}: {got['error']}"
        hist = reports[0][name]["history"]
        epochs = [m for m in hist if not m.get("partial")]
        assert [m["epoch"] for m in epochs] == [1] and math.isfinite(epochs[0]["loss"]), hist
        # what MLflow logs: every reported metric a plain number, the same on both ranks (a barrier each)
        assert all(isinstance(v, (int, float, bool, str)) or v is None for m in hist for v in m.values()), hist
        assert [m["loss"] for m in reports[1][name]["history"]] == [m["loss"] for m in hist]
        _check_metrics(name, epochs[0])
        _check_names(name, epochs[0])
        assert reports[0][name]["checkpoints"] == ["epoch_0001"], reports[0][name]["checkpoints"]
        return

    # The shared runs: `sslray pretrain` on 2 Ray workers, logged to MLflow, probe and pictures on.
    shared = request.getfixturevalue("tiny_runs")
    client = MlflowClient(shared.uri)
    exp = client.get_experiment_by_name(shared.experiment)
    runs = client.search_runs([exp.experiment_id], f"params.`method.name` = '{name}'")
    assert len(runs) == 1, f"{name}: expected one MLflow run, found {len(runs)}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["ray.num_workers"] == "2" and run.data.tags["sslray.method"] == name
    hist = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in hist] == list(range(1, EPOCHS + 1)), \
        f"{name}: per-epoch loss history {[(m.step, m.value) for m in hist]}"
    assert all(math.isfinite(m.value) for m in hist), f"{name}: non-finite loss {[m.value for m in hist]}"
    _check_metrics(name, run.data.metrics)
