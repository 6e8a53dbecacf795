"""A session fixture with real tiny sslray runs of several methods in one MLflow store.

`sslray compare` (tests/test_compare.py) and the MLflow UI browser test (tests/test_browser.py) read the
same runs, so the ~1-2 minutes each run costs on a 2-core CPU is paid once per session. Test modules
load it with ``pytest_plugins = ["conftest_runs"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

EXPERIMENT = "compare-e2e"

# (method, extra overrides). Two epochs so every curve has two points; the smoke recipe caps an epoch at
# 3 steps of 32 images. MAE needs a ViT: ViT-Tiny with 4-px patches (8x8 grid) and a small decoder.
CANDIDATES: list[tuple[str, list[str]]] = [
    ("simclr", ["method.temperature=0.2"]),
    ("byol", ["views.preset=byol"]),
    ("barlowtwins", []),
    ("mae", ["--backbone", "vit_tiny_patch16_224", "views.preset=mae", "method.params.patch_size=4",
             "method.params.decoder_dim=64", "method.params.decoder_depth=1", "method.params.decoder_heads=2",
             "model.sync_bn=false", "optim.name=adamw", "optim.base_lr=1.5e-4", "optim.weight_decay=0.05"]),
]


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
        rc = main(["pretrain", "--recipe", "smoke", "--method", method, "--data", cifar_small["train"],
                   "--val", cifar_small["test"], "--workers", "2", "--experiment", EXPERIMENT,
                   "--tracking-uri", uri, "--storage", str(root / "runs"), *extra])
        assert rc == 0, f"sslray pretrain --method {method} failed"
        methods.append(method)
    return TinyRuns(uri, db, EXPERIMENT, methods, root)
