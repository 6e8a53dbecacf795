"""The training loop without Ray: one process on real CIFAR-10, checkpoint, resume, NaN stop."""

from __future__ import annotations

import pytest
import torch

from sslray.config import load_config
from sslray.raytrain.loop import NonFiniteLossError, run_local

pytestmark = pytest.mark.slow


def _cfg(cifar_small, *extra):
    return load_config("smoke", [f"data.train={cifar_small['train']}", f"data.val={cifar_small['test']}",
                                 "ray.num_workers=1", *extra])


def test_local_run_learns_reports_and_resumes(cifar_small, tmp_path):
    cfg = _cfg(cifar_small, "train.epochs=2", "train.max_steps_per_epoch=4")
    last, session = run_local(cfg, str(tmp_path / "ckpt"))
    assert [m["epoch"] for m in session.history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in session.history)
    assert 0.0 <= last["knn_top1"] <= 1.0 and last["step"] == 8
    assert (tmp_path / "ckpt" / "epoch_0002" / "state.pt").exists()

    # Same dir, more epochs: resumes at epoch 3 with the step counter carried over.
    cfg3 = cfg.replace(**{"train.epochs": 3})
    last3, s3 = run_local(cfg3, str(tmp_path / "ckpt"))
    assert [m["epoch"] for m in s3.history] == [3]
    assert last3["step"] == 12


def test_non_finite_loss_names_the_step(cifar_small, poison_loss):
    poison_loss(3)
    cfg = _cfg(cifar_small, "train.epochs=1", "train.max_steps_per_epoch=5", "data.val=")
    with pytest.raises(NonFiniteLossError, match=r"simclr: non-finite loss .* at step 2"):
        run_local(cfg)


def test_resident_data_path_runs_the_same_loop(cifar_small):
    cfg = _cfg(cifar_small, "data.resident=true", "train.epochs=1", "train.max_steps_per_epoch=3")
    last, session = run_local(cfg)
    assert last["epoch"] == 1 and last["step"] == 3 and 0.0 <= last["knn_top1"] <= 1.0


def test_simclr_multicrop_runs_the_loop_on_real_cifar(cifar_small, monkeypatch):
    """SimCLR with 2 global + 4 local crops through the real loop and loader: the multi-positive loss
    sees all six views of every image, and the online probe still takes the first global view's
    features from the training forward (no extra encode)."""
    from sslray.raytrain.methods import simclr
    from sslray.raytrain.online_probe import OnlineProbe

    seen, fed = [], {"features": 0, "encode": 0}
    real = simclr.multiview_nt_xent_loss
    monkeypatch.setattr(simclr, "multiview_nt_xent_loss", lambda zs, t: seen.append([tuple(z.shape) for z in zs])
                        or real(zs, t))
    def counting(key, fn):
        def wrapped(*a):
            fed[key] += 1
            return fn(*a)
        return wrapped

    monkeypatch.setattr(OnlineProbe, "step_features", counting("features", OnlineProbe.step_features))
    monkeypatch.setattr(OnlineProbe, "step", counting("encode", OnlineProbe.step))
    cfg = _cfg(cifar_small, "views.local_crops=4", "train.epochs=1", "train.max_steps_per_epoch=3")
    last, _ = run_local(cfg)
    assert seen == [[(32, 32)] * 6] * 3  # batch 32, proj_out_dim 32, six views per step
    assert fed == {"features": 3, "encode": 0}
    assert torch.isfinite(torch.tensor(last["loss"])) and 0.0 <= last["knn_top1"] <= 1.0
    assert 0.0 <= last["online_probe_top1"] <= 1.0


def test_a_run_starts_from_an_exported_backbone(cifar_small, tmp_path, capsys):
    """model.init_weights on real CIFAR-10: a run starts from an exported backbone (with lr 0 its
    weights stay exactly there), and a resumed run is not re-initialised."""
    from sslray.export import export_backbone, load_backbone
    from sslray.raytrain.methods import create_method

    src = _cfg(cifar_small)
    torch.manual_seed(99)  # not the run's own seeded init
    (tmp_path / "a" / "epoch_0001").mkdir(parents=True)
    torch.save({"config": src.to_dict(), "model": create_method(src).state_dict(), "epoch": 1, "step": 1},
               tmp_path / "a" / "epoch_0001" / "state.pt")
    exp = export_backbone(tmp_path / "a", tmp_path / "exp")
    cfg = _cfg(cifar_small, "train.epochs=1", "train.max_steps_per_epoch=2", "data.val=", f"model.init_weights={exp}",
               "optim.base_lr=0", "optim.weight_decay=0", "train.online_probe=false")
    run_local(cfg, str(tmp_path / "b"))
    assert f"backbone start from {exp}" in capsys.readouterr().out
    want = load_backbone(exp)[0].state_dict()
    got = torch.load(tmp_path / "b" / "epoch_0001" / "state.pt", weights_only=False)["model"]
    params = [k for k, _ in load_backbone(exp)[0].named_parameters()]
    assert params and all(torch.equal(got[f"backbone.{k}"], want[k]) for k in params)

    # Resuming run b for a second epoch loads its checkpoint and never reads the init file again.
    (exp / "backbone.safetensors").unlink()
    last, _ = run_local(cfg.replace(**{"train.epochs": 2}), str(tmp_path / "b"))
    assert last["epoch"] == 2
