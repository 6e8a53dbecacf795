"""End to end on a small real CIFAR-10 subset: `sslray pretrain` with 2 Ray workers leaves one
MLflow run with params, per-epoch metrics, probe metrics and PNG artifacts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sslray.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_pretrain_cli_logs_everything(ray_cluster, cifar_small, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    rc = main(["pretrain", "--recipe", "smoke", "--data", cifar_small["train"], "--val", cifar_small["test"],
               "--workers", "2", "--experiment", "e2e", "--name", "e2e-run"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "random init" in out and "pretrained" in out

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default store in the cwd
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "simclr" and run.data.params["ray.num_workers"] == "2"
    assert run.data.tags["sslray.method"] == "simclr"
    for key in ("loss", "lr", "images_per_sec", "knn_top1"):
        hist = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [1, 2], key
    for key in ("probe_linear_top1", "probe_linear_macro_f1", "probe_knn_top1", "random_init_knn_top1",
                "random_init_linear_top1", "gain_knn_top1"):
        assert key in run.data.metrics, key
        assert 0.0 <= run.data.metrics[key] <= 1.0 or key.startswith("gain")

    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png", "probe"} <= arts
    probe_arts = {a.path for a in client.list_artifacts(run.info.run_id, "probe")}
    assert {"probe/confusion_matrix.png", "probe/classification_report.txt"} <= probe_arts
    for name in ("curves.png", "probe/confusion_matrix.png"):
        local = client.download_artifacts(run.info.run_id, name, str(tmp_path / "dl"))
        with Image.open(local) as im:
            assert im.width > 200 and im.height > 150
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # not blank
    # The checkpoint the run reports exists and holds the model state.
    assert (tmp_path / "runs" / "e2e-run").is_dir()

    # The final backbone is exported beside the checkpoints and logged to the run: loaded from the
    # MLflow copy alone, it gives the checkpoint's backbone features on real CIFAR-10 images.
    import torch

    from sslray.export import load_backbone
    from sslray.raytrain.evaluate import load_checkpoint

    assert {"backbone/backbone.safetensors", "backbone/backbone.json"} == {
        a.path for a in client.list_artifacts(run.info.run_id, "backbone")}
    assert "backbone exported to" in out and (tmp_path / "runs" / "e2e-run" / "backbone" / "backbone.json").exists()
    backbone, meta = load_backbone(client.download_artifacts(run.info.run_id, "backbone", str(tmp_path / "bb")))
    _, model, state = load_checkpoint(tmp_path / "runs" / "e2e-run", torch.device("cpu"))
    assert (meta["method"], meta["epoch"], int(state["epoch"])) == ("simclr", 2, 2)  # smoke: 2 epochs
    files = sorted(p for p in cifar_small["test_tree"].rglob("*.jpg"))[:8]
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    x = (x.float() / 255 - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = backbone(x)
        torch.testing.assert_close(feats, model.backbone.eval()(x), rtol=0, atol=0)
    assert feats.shape == (8, meta["num_features"]) and float(feats.std(0).mean()) > 0
