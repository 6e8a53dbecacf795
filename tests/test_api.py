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


def test_sweep_takes_a_dict_space_and_builds_the_spec_the_cli_would(monkeypatch, tmp_path, tiny_betons):
    """``sslray.sweep`` and ``sslray tune`` share one path: the same space (dict here, strings there)
    gives the same spec; Ray is not started because the search itself is stubbed."""
    import sslray
    from sslray.cli import main
    from sslray.config import ConfigError
    from sslray.tune import sweep as sweep_mod

    specs = []
    monkeypatch.setattr(sweep_mod, "run_sweep", lambda spec, **kw: specs.append((spec, kw)) or _Result(spec))
    monkeypatch.setattr(sweep_mod, "print_summary", lambda *a: None)
    train, val = tiny_betons["train"], tiny_betons["val"]  # the data is checked before Ray, as pretrain does
    cfg = sslray.load_config("simclr_cifar10", {"data.train": train, "data.val": val, "train.epochs": 4,
                                                "data.batch_size": 32})
    sslray.sweep(cfg, {"lr": "loguniform(0.01,1)", "temperature": [0.1, 0.2]}, name="s", storage=str(tmp_path),
                 gpus_per_worker=0, num_samples=3, grace_period=2)
    assert main(["tune", "--recipe", "simclr_cifar10", "--data", train, "--val", val, "--max-epochs", "4",
                 "data.batch_size=32",
                 "--space", "lr=loguniform(0.01,1)", "--space", "temperature=choice(0.1,0.2)", "--name", "s",
                 "--storage", str(tmp_path), "--gpus-per-worker", "0", "--num-samples", "3",
                 "--grace-period", "2"]) == 0
    (api, _), (cli, _) = specs
    assert api.space == cli.space and set(api.space) == {"optim.base_lr", "method.temperature"}
    assert (api.num_samples, api.grace_period, api.max_epochs) == (3, 2, 4)
    assert api.base == cli.base and api.base["data"]["train"] == train
    with pytest.raises(ConfigError, match="data.train"):
        sslray.sweep(sslray.load_config("smoke"), name="s", gpus_per_worker=0)


class _Result:
    def __init__(self, spec):
        self.spec, self.best, self.parent_run_id, self.tracking_uri = spec, None, "r", "sqlite:///x.db"


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
    saved = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*/state.pt")}
    again = sslray.train_local(cfg, tmp_path / "run")  # the folder holds epoch 2: nothing left to train
    assert again["epoch"] == 2 and again["loss"] == metrics["loss"]
    # ... and nothing was trained again (a run from scratch would give the same loss and write new states)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*/state.pt")} == saved

    report = sslray.probe(tmp_path / "run", cfg.data.train, cfg.data.val, train_subset=200, val_subset=100)
    assert 0 <= report.pretrained["linear_top1"] <= 1 and set(report.random_init) == set(report.pretrained)

    where = sslray.export_backbone(tmp_path / "run", tmp_path / "exported")
    backbone, meta = sslray.load_backbone(where)
    state = torch.load(tmp_path / "run" / "epoch_0002" / "state.pt", map_location="cpu", weights_only=False)
    want = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    got = backbone.state_dict()
    assert meta["epoch"] == 2 and set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())

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


def test_pretrain_and_probe_take_the_cli_probe_options(monkeypatch):
    """`--no-baseline` and `--linear-c` reach the Python API's pretrain and probe as they reach the CLI's."""
    import sslray
    from sslray import cli
    from sslray.config import load_config
    from sslray.raytrain import evaluate

    seen = {}
    monkeypatch.setattr(cli, "run_pretrain", lambda cfg, **kw: seen.setdefault("pretrain", kw))
    monkeypatch.setattr(evaluate, "probe_checkpoint", lambda *a, **kw: seen.setdefault("probe", kw))
    sslray.pretrain(load_config("smoke"), baseline=False, linear_c=[0.1, 1.0], evaluate="knn",
                    eval_settings={"knn_ks": [5]})
    sslray.probe("ckpt", "train", "val", random_baseline=False, linear_c=[0.1, 1.0])
    assert (seen["pretrain"]["baseline"], seen["pretrain"]["linear_c"]) == (False, (0.1, 1.0))
    assert seen["pretrain"]["eval_settings"] == {"knn_ks": [5]}  # the --knn-k, --ft-*, --lin-* settings
    assert (seen["probe"]["random_baseline"], seen["probe"]["linear_c"]) == (False, (0.1, 1.0))
