"""A session fixture with real tiny sslray runs of several methods in one MLflow store.

`sslray compare` (tests/test_compare.py), the MLflow UI browser test (tests/test_browser.py) and the
every-method Ray test (tests/test_all_methods_ray.py, for these methods) read the same runs, so the
~40 s each `sslray pretrain` costs on a 2-core CPU is paid once per session. Test modules load it with
``pytest_plugins = ["conftest_runs"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

EXPERIMENT = "compare-e2e"

# (method, extra overrides) on top of the method's own CIFAR recipe at CI size (tiny_overrides) and two
# epochs, so every curve has two points. SimCLR at T=0.2 so the compare table's knob is not a default.
# One method per family the compare table and its per-family plot tell apart (contrastive,
# non-contrastive, MIM): each more costs ~55 s of CI; the other methods train in
# tests/test_all_methods_ray.py's gloo pair.
CANDIDATES: list[tuple[str, list[str]]] = [
    ("simclr", ["method.temperature=0.2"]),
    ("barlowtwins", []),
    ("mae", []),
]
EPOCHS = 2


def tiny_overrides(name: str) -> list[str]:
    """``name``'s CIFAR recipe shrunk to CI size: the registry-wide tiny sizes of tests/test_methods.py
    (small backbone, shrunk queues, prototypes and decoders), 2 steps of 16 images per epoch, a 64-image
    val split, one epoch, no pictures."""
    from test_methods import EXTRA, PARAMS, TINY

    tiny = {**TINY, **EXTRA.get(name, {}), **{f"method.params.{k}": v for k, v in PARAMS.get(name, {}).items()}}
    tiny.update({"data.batch_size": 16, "data.train_subset": 128, "data.val_subset": 64, "data.knn_bank": 128,
                 "data.loader_workers": 1, "data.decode_res": 32, "train.epochs": 1, "train.max_steps_per_epoch": 2,
                 "train.knn_every": 1, "train.log_every": 0, "optim.warmup_epochs": 0, "ray.num_to_keep": 1,
                 "monitor.pictures": False})
    return [f"{k}={v}" for k, v in tiny.items()]


@dataclass
class TinyRuns:
    uri: str  # sqlite:///.../mlflow.db
    db: Path
    experiment: str
    methods: list[str]  # in the order they were run
    root: Path


def tiny_run_specs() -> list[tuple[str, list[str]]]:
    """SimCLR always; the other candidates that are registered (other developers add methods)."""
    from sslray.raytrain.methods import METHODS

    specs = [(m, extra) for m, extra in CANDIDATES if m in METHODS]
    if len(specs) < 3:  # too few methods registered: vary SimCLR's temperature instead
        specs += [("simclr", [f"method.temperature={t}"]) for t in (0.5, 1.0)][: 3 - len(specs)]
    return specs


@pytest.fixture(scope="session")
def tiny_runs(ray_cluster, cifar_small, tmp_path_factory) -> TinyRuns:
    from sslray.cli import main

    root = tmp_path_factory.mktemp("tiny_runs")
    db = root / "mlflow.db"
    uri = f"sqlite:///{db}"
    methods = []
    for method, extra in tiny_run_specs():
        rc = main(["pretrain", "--recipe", f"{method}_cifar10", "--data", cifar_small["train"],
                   "--val", cifar_small["test"], "--workers", "2", "--experiment", EXPERIMENT,
                   "--tracking-uri", uri, "--storage", str(root / "runs"), *tiny_overrides(method),
                   f"train.epochs={EPOCHS}", "monitor.pictures=true", *extra])  # test_pictures reads them
        assert rc == 0, f"sslray pretrain --method {method} failed"
        methods.append(method)
    return TinyRuns(uri, db, EXPERIMENT, methods, root)
