"""Pictures of a run: view grids, schedules, MAE reconstructions, kNN retrieval, and their way to MLflow.

Fast tier: the drawing helpers, MAE's reconstruction contract, the schedules, the driver's picture
logger. Slow: `sslray views` on real CIFAR-10. Ray: the shared tiny runs (tests/conftest_runs.py)
must carry every picture as a readable, non-blank PNG.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sslray import plots
from sslray.config import load_config

pytest_plugins = ["conftest_runs"]


def assert_png(data: bytes, min_w: int = 200, min_h: int = 100) -> np.ndarray:
    """Decodes as a PNG of at least the given size and is not one flat colour."""
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        w, h = im.size
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert w >= min_w and h >= min_h, (w, h)
    assert arr.std() > 10, "blank picture"
    return arr


def test_image_grid_shows_the_images_it_was_given():
    """Each cell is drawn, in its row and column: solid colours are found where the grid puts them."""
    colours = [[(230, 20, 20), (20, 200, 20), (20, 20, 230)], [(240, 200, 0), (200, 0, 200), (0, 200, 200)]]
    rows = [[np.full((32, 32, 3), c, np.uint8) for c in row] for row in colours]
    rows[1].append(np.full((16, 16, 3), (90, 60, 30), np.uint8))  # cells may differ in size and count
    colours[1].append((90, 60, 30))
    arr = assert_png(plots.png_bytes(plots.image_grid(rows, ["a", "b", "c", "d"], ["r1", "r2"], title="grid")))
    where = {}
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            ys, xs = np.nonzero((np.abs(arr - np.array(colour, np.float32)) <= 2).all(-1))
            assert len(ys) >= 400, f"cell ({r}, {c}) {colour}: {len(ys)} pixels"
            where[r, c] = (ys.mean(), xs.mean())
    for r, row in enumerate(colours):
        xs = [where[r, c][1] for c in range(len(row))]
        assert xs == sorted(xs), f"row {r}: cells out of column order"
    assert all(where[1, c][0] > where[0, c][0] for c in range(3)), "rows out of order"


def test_to_images_undoes_the_normalisation():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    normed = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    back = plots.to_images(normed, mean, std)
    assert back[0].shape == (8, 8, 3) and back[0].dtype == np.uint8
    assert np.abs(back[1].astype(int) - x[1].permute(1, 2, 0).numpy().astype(int)).max() <= 1


def test_schedules_follow_the_optimizer_and_the_teacher():
    from sslray.raytrain.methods import create_method
    from sslray.raytrain.pictures import schedule_series

    cfg = load_config("smoke", ["method.name=byol", "views.preset=byol", "optim.min_lr_ratio=0.1"])
    torch.manual_seed(0)
    steps, s = schedule_series(cfg, create_method(cfg), total=100, warmup=10, peak=0.5)
    assert list(steps) == list(range(100))
    assert s["lr"][9] == pytest.approx(0.5) and s["lr"][0] == pytest.approx(0.05) and s["lr"][-1] > 0.05
    assert s["ema_momentum"][0] == pytest.approx(0.996) and s["ema_momentum"][-1] > 0.9999
    assert set(s["weight_decay"]) == {cfg.optim.weight_decay}
    simclr = load_config("smoke")
    _, s2 = schedule_series(simclr, create_method(simclr), total=5000, warmup=10, peak=0.5)
    assert "ema_momentum" not in s2 and len(s2["lr"]) == 1000  # no teacher; at most 1000 points
    assert_png(plots.png_bytes(plots.schedules(s, "byol", xs=steps)))


def test_mae_reconstruction_keeps_visible_patches_and_masks_the_rest():
    from sslray.raytrain.methods import create_method

    cfg = load_config("smoke", ["method.name=mae", "model.backbone=vit_tiny_patch16_224", "views.preset=mae",
                                "method.params.patch_size=4", "method.params.decoder_dim=32",
                                "method.params.decoder_depth=1", "method.params.decoder_heads=2"])
    torch.manual_seed(0)
    model = create_method(cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    masked, recon = model.reconstruct(x, generator=torch.Generator().manual_seed(0))
    assert masked.shape == recon.shape == x.shape
    visible = masked.abs().sum(1) > 0  # (B, H, W): pixels of the visible patches
    frac = 1 - visible.float().mean().item()
    assert frac == pytest.approx(0.75, abs=0.02)  # mask_ratio 0.75 of the 8x8 patches
    assert torch.allclose(recon[visible.unsqueeze(1).expand_as(x)], x[visible.unsqueeze(1).expand_as(x)], atol=1e-5)
    again, _ = model.reconstruct(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, masked)  # the seeded generator fixes the mask


def test_driver_logs_each_new_picture_once(tmp_path):
    from mlflow.tracking import MlflowClient

    from sslray.raytrain.session import write_picture
    from sslray.raytrain.reporting import log_pictures
    from sslray.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker.start(uri, "pictures", "r")
    folder = tmp_path / "run" / "pictures"
    png = plots.png_bytes(plots.schedules({"lr": [0.1, 0.2, 0.3]}))
    write_picture(str(folder), "views.png", png)
    (folder / ".half.png.tmp").write_bytes(b"partial")  # a write in progress is never logged
    seen: dict = {}
    assert log_pictures(t, str(folder), seen) == ["views.png"]
    assert log_pictures(t, str(folder), seen) == []
    write_picture(str(folder), "retrieval.png", png)
    assert log_pictures(t, str(folder), seen) == ["retrieval.png"]
    names = sorted(a.path for a in MlflowClient(uri).list_artifacts(t.run_id, "pictures"))
    assert names == ["pictures/retrieval.png", "pictures/views.png"]
    assert log_pictures(t, str(tmp_path / "nowhere"), {}) == []  # no folder yet: nothing, no error
    # The driver at the end of a run (the callback's memory is in another process): only what is missing.
    from sslray.raytrain.reporting import log_missing_pictures

    assert log_missing_pictures(t, str(folder)) == []
    write_picture(str(folder), "final.png", png)
    assert log_missing_pictures(t, str(folder)) == ["final.png"]


def test_health_tags_name_the_epoch_and_the_statistic():
    from sslray.raytrain.reporting import COLLAPSE_TAG, NONFINITE_TAG, health_tags

    m = {"epoch": 3, "z_std_ratio": 0.001, "z_rankme": 1.0, "z_mean_cos": 0.999, "feats_std_ratio": 0.8,
         "feats_rankme": 40.0, "feats_mean_cos": 0.3, "nonfinite_skipped_frac": 0.02}
    tags = health_tags(m)
    assert tags[COLLAPSE_TAG].startswith("epoch 3: collapse warning: projector outputs: std x sqrt(d) 0.001")
    assert "backbone" not in tags[COLLAPSE_TAG] and tags[NONFINITE_TAG] == "epoch 3: 2.00% of steps skipped"
    assert health_tags({"epoch": 1, **{k: v for k, v in m.items() if k.startswith("feats")}}) == {}


@pytest.mark.slow
def test_views_command_draws_the_methods_views(cifar_small, tmp_path, capsys):
    from sslray.cli import main

    out = tmp_path / "v.png"
    assert main(["views", "--data", cifar_small["test"], "--method", "byol", "--out", str(out), "-n", "4"]) == 0
    arr = assert_png(out.read_bytes())
    two = tmp_path / "v2.png"
    assert main(["views", "--data", cifar_small["test"], "--method", "byol", "--out", str(two), "-n", "2"]) == 0
    arr2 = assert_png(two.read_bytes())
    # One row per source image; the widths differ by the title only.
    assert arr.shape[0] > 1.5 * arr2.shape[0] and abs(arr.shape[1] - arr2.shape[1]) < 0.1 * arr.shape[1]
    assert main(["views", "--data", cifar_small["test"], "--method", "nosuch"]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    assert main(["views", "--data", str(tmp_path / "missing.beton"), "--method", "simclr"]) == 2
    assert "missing.beton" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_every_tiny_run_logs_its_pictures_to_mlflow(tiny_runs, tmp_path):
    from mlflow.tracking import MlflowClient

    from sslray.tracking import search_runs

    c = MlflowClient(tiny_runs.uri)
    runs = search_runs(tiny_runs.uri, tiny_runs.experiment)
    assert {r.tags.get("sslray.method") for r in runs} >= set(tiny_runs.methods)
    for r in runs:
        method = r.tags["sslray.method"]
        want = ["pictures/views.png", "pictures/schedules.png", "pictures/retrieval.png", "probe/retrieval.png"]
        if method == "mae":  # 2 epochs: the last epoch always draws one
            want.append("pictures/mae_reconstruction_epoch_0002.png")
        logged = {a.path for d in ("pictures", "probe") for a in c.list_artifacts(r.run_id, d)}
        assert set(want) <= logged, (method, sorted(logged))
        for path in want:
            local = c.download_artifacts(r.run_id, path, str(tmp_path / r.run_id[:8]))
            with open(local, "rb") as f:
                assert_png(f.read(), min_w=150, min_h=150)
        # The health metrics land beside the loss, one point per epoch.
        for key in ("grad_norm_backbone", "images_per_sec_per_worker", "data_wait_ms_per_step", "feats_rankme"):
            assert len(c.get_metric_history(r.run_id, key)) == 2, (method, key)


def test_sweep_plot_of_categorical_keys_draws_no_empty_legend():
    """A study's keys (method, policy) are strings: nothing to scatter, and no legend call that warns."""
    import warnings

    rows = [{"config": {"method": "simclr"}, "status": "completed", "knn_top1": 0.5}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.metric_vs_params(rows, ["method"], "knn_top1")
    assert fig.axes[0].get_legend() is None
    plots.close(fig)


def test_sweep_plot_draws_failed_trials_on_the_finite_floor_and_curves_without_points_draw_no_legend():
    """A NaN metric (a diverged trial that still finished) must not become the floor, else every failed
    trial's cross is drawn at NaN, which is nowhere."""
    import math
    import warnings

    rows = [{"config": {"lr": 0.1}, "status": "completed", "knn_top1": math.nan},
            {"config": {"lr": 0.2}, "status": "completed", "knn_top1": 0.4},
            {"config": {"lr": 0.3}, "status": "stopped_early", "knn_top1": 0.3},
            {"config": {"lr": 0.5}, "status": "failed", "knn_top1": None}]
    fig = plots.metric_vs_params(rows, ["lr"], "knn_top1")
    crosses = [c for c in fig.axes[0].collections if c.get_label() == "failed"]
    assert [tuple(xy) for xy in crosses[0].get_offsets().tolist()] == [(0.5, 0.3)]
    plots.close(fig)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.overlay({"simclr": [], "byol": []}, "kNN", "top-1")
    assert fig.axes[0].get_legend() is None
    plots.close(fig)
