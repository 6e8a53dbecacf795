"""The Python API (``import sslray``): light to import, every name a function of the package, and the
notebook flow on real CIFAR-10: convert -> train in this process -> probe -> export -> load, then
``sslray.pretrain`` returning its MLflow run, probe report and export location."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


def test_import_sslray_loads_neither_torch_nor_ray():
    code = ("import sys, sslray; heavy = [m for m in ('torch', 'ray', 'mlflow', 'ffcv') if m in sys.modules]; "
            "print(json.dumps(heavy))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_every_api_name_is_the_function_even_after_its_namesake_module_is_imported():
    import sslray
    import sslray.api
    import sslray.export  # noqa: F401  (the module of the same stem must not shadow the function)

    assert set(sslray.API) == set(sslray.api.__all__)
    for name in sslray.API:
        assert getattr(sslray, name) is getattr(sslray.api, name), name
    assert callable(sslray.export_backbone) and sslray.export_backbone.__module__ == "sslray.api"
    with pytest.raises(AttributeError, match="no attribute 'pretrian'"):
        sslray.pretrian  # noqa: B018
    cfg = sslray.load_config("smoke", {"train.epochs": 3})
    assert cfg.train.epochs == 3


@pytest.mark.slow
def test_the_notebook_flow_on_real_cifar(cifar_small, tmp_path, monkeypatch):
    import sslray
    from sslray.raytrain import trainer
    from sslray.tracking import Tracker

    manifest = sslray.convert(cifar_small["train_tree"], tmp_path / "train.beton", max_res=32, workers=1)
    assert manifest["num_images"] == 1000 and len(manifest["classes"]) == 10
    cfg = sslray.load_config("smoke", {"data.train": str(tmp_path / "train.beton"), "data.val": cifar_small["test"],
                                       "ray.num_workers": 1, "train.epochs": 2, "model.backbone": "resnet10t"})
    metrics = sslray.train_local(cfg, tmp_path / "run")
    assert metrics["epoch"] == 2 and 0 <= metrics["knn_top1"] <= 1
    again = sslray.train_local(cfg, tmp_path / "run")  # the folder holds epoch 2: nothing left to train
    assert again["epoch"] == 2 and again["loss"] == metrics["loss"]

    report = sslray.probe(tmp_path / "run", cfg.data.train, cfg.data.val, train_subset=200, val_subset=100)
    assert 0 <= report.pretrained["linear_top1"] <= 1 and set(report.random_init) == set(report.pretrained)

    where = sslray.export_backbone(tmp_path / "run", tmp_path / "exported")
    backbone, meta = sslray.load_backbone(where)
    state = torch.load(tmp_path / "run" / "epoch_0002" / "state.pt", map_location="cpu", weights_only=False)
    want = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    got = backbone.state_dict()
    assert meta["epoch"] == 2 and all(torch.equal(got[k], v) for k, v in want.items() if k in got)

    # sslray.pretrain: training itself (Ray Train) is stubbed with the checkpoint above; export, probe
    # and MLflow are real, and the Run carries all three.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker.start(uri, "api", "api-run")
    (tmp_path / "run" / "sslray_run.json").write_text(json.dumps({"run_id": t.run_id, "tracking_uri": uri}))
    res = trainer.PretrainResult(t.run_id, uri, str(tmp_path / "run" / "epoch_0002"), metrics, "run", str(tmp_path))
    monkeypatch.setattr(trainer, "pretrain", lambda c, restart=False: res)
    run = sslray.pretrain(cfg, probe_train_subset=200, probe_val_subset=100)
    assert (run.run_id, run.checkpoint, run.metrics) == (t.run_id, res.checkpoint, metrics)
    assert run.backbone == str(tmp_path / "run" / "backbone") and sslray.load_backbone(run.backbone)[1]["epoch"] == 2
    assert run.probe.pretrained["knn_top1"] == pytest.approx(report.pretrained["knn_top1"], abs=0.05)
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(tracking_uri=uri).get_run(t.run_id)
    assert "probe_linear_top1" in logged.data.metrics and logged.info.status == "FINISHED"
