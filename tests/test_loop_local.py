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


def test_mid_epoch_resume_on_an_image_folder_continues_exactly(cifar_small, tmp_path):
    """A run resumed from a mid-epoch checkpoint of ImageFolder data takes the steps the whole run took:
    the DataLoader's start must not draw from the views' random stream."""
    import shutil

    from sslray.raytrain.session import LocalSession
    from sslray.raytrain.loop import train_loop

    cfg = _cfg(cifar_small, f"data.train={cifar_small['train_tree']}", "data.val=", "data.train_subset=256",
               "data.loader_workers=0", "model.backbone=resnet10t", "train.epochs=1", "train.max_steps_per_epoch=0",
               "train.log_every=1", "train.checkpoint_every_steps=4", "train.online_probe=false",
               "monitor.collapse=false")
    lines = {}
    for name in ("whole", "resumed"):
        ck = tmp_path / name
        if name == "resumed":  # only the whole run's mid-epoch checkpoint, then the loop
            mid = next((tmp_path / "whole").glob("epoch_0000.*_step_*"))
            shutil.copytree(mid, ck / mid.name)
        out: list = []
        train_loop(cfg, LocalSession(str(ck), "false", printer=lambda m, flush=True: out.append(m)))
        lines[name] = [m.split(" lr")[0] for m in out if m.startswith("epoch 1/1 step")]
    assert len(lines["whole"]) == 8 and len(lines["resumed"]) == 4
    assert lines["resumed"] == lines["whole"][4:]


def test_a_mid_epoch_resume_reports_the_whole_epochs_grad_norms_and_skipped_steps(cifar_small, tmp_path,
                                                                                    poison_loss):
    """The epoch's health sums go into a mid-epoch checkpoint: the resumed epoch's grad norms and
    skipped fraction are the uninterrupted epoch's, a skipped step before the checkpoint included."""
    import shutil

    cfg = _cfg(cifar_small, "data.val=", "data.train_subset=192", "train.epochs=1", "train.max_steps_per_epoch=0",
               "train.checkpoint_every_steps=4", "monitor.max_nonfinite_skips=1", "train.online_probe=false",
               "model.backbone=resnet10t")
    poison_loss(2)  # the whole run's step 2 (before the checkpoint at step 4)
    whole, _ = run_local(cfg, str(tmp_path / "whole"))
    assert whole["step"] == 6 and whole["nonfinite_skipped_frac"] == pytest.approx(1 / 6)
    mid = next((tmp_path / "whole").glob("epoch_0000.*_step_*"))
    shutil.copytree(mid, tmp_path / "resumed" / mid.name)
    resumed, s = run_local(cfg, str(tmp_path / "resumed"))
    assert s.history[-1]["epoch"] == 1 and resumed["step"] == 6
    for k in ("grad_norm_backbone", "grad_norm_heads", "nonfinite_skipped_frac", "loss"):
        assert resumed[k] == pytest.approx(whole[k], rel=1e-6), k


def test_a_mid_epoch_resume_on_fewer_workers_counts_the_saved_loss_once(cifar_small, tmp_path):
    """A mid-epoch checkpoint holds the loss summed over the saving run's ranks; resumed on another
    number of workers, the epoch's mean loss divided it by the new count (8 -> 4 workers: 1.5x). Here
    the checkpoint says 2 ranks with the same per-rank sum, resumed on one: the whole epoch's loss."""
    import shutil

    import torch

    cfg = _cfg(cifar_small, "data.val=", "data.train_subset=192", "train.epochs=1", "train.max_steps_per_epoch=0",
               "train.checkpoint_every_steps=4", "train.online_probe=false", "model.backbone=resnet10t")
    whole, _ = run_local(cfg, str(tmp_path / "whole"))
    mid = next((tmp_path / "whole").glob("epoch_0000.*_step_*"))
    shutil.copytree(mid, tmp_path / "resumed" / mid.name)
    state_file = tmp_path / "resumed" / mid.name / "state.pt"
    state = torch.load(state_file, weights_only=False)
    assert state["partial"]["world_size"] == 1
    state["partial"] = {**state["partial"], "world_size": 2, "loss_sum": 2 * state["partial"]["loss_sum"]}
    torch.save(state, state_file)
    resumed, _ = run_local(cfg, str(tmp_path / "resumed"))
    assert resumed["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_resuming_at_another_batch_rescales_the_step_counter(cifar_small, tmp_path, capsys):
    """A checkpoint's step counter belongs to its steps per epoch: resumed at half the batch (what an
    out-of-memory error advises) it is doubled, so the lr / wd / momentum schedules go on from the same
    point instead of jumping back and never reaching their end."""
    cfg = _cfg(cifar_small, "data.val=", "data.train_subset=128", "train.epochs=1", "train.max_steps_per_epoch=0",
               "train.online_probe=false")
    first, _ = run_local(cfg, str(tmp_path / "ckpt"))
    assert first["step"] == 4  # 128 images at batch 32
    from sslray.config import effective_lr

    half = cfg.replace(**{"train.epochs": 2, "data.batch_size": 16})
    last, s = run_local(half, str(tmp_path / "ckpt"))
    assert "4 steps per epoch, this run has 8" in capsys.readouterr().out
    assert [m["epoch"] for m in s.history] == [2] and last["step"] == 16  # 8 (epoch 1 at batch 16) + 8
    # The last step is step 15 of 16: the cosine is at its end (~2% of the peak), not at a third of it.
    assert last["lr"] < 0.05 * effective_lr(half), "the cosine did not reach its end"


def test_a_checkpoint_from_before_the_new_keys_resumes_as_it_was_trained(cifar_small, tmp_path, capsys):
    """MAE's paper init freezes the encoder's position embedding (one tensor less for the optimizer),
    and the CIFAR LARS recipes changed LARS: a checkpoint written before those keys existed failed to
    load its optimizer state ("parameter group that doesn't match"), or would have resumed with ~20x
    larger steps. Its run goes on with the behaviour it was trained with, said once."""
    from sslray.raytrain.loop import as_started

    cfg = _cfg(cifar_small, "method.name=mae", "model.backbone=vit_tiny_patch16_224", "views.preset=mae",
               "method.params.patch_size=8", "method.params.decoder_dim=32", "method.params.decoder_depth=1",
               "method.params.decoder_heads=2", "train.epochs=1", "train.max_steps_per_epoch=2",
               "train.online_probe=false", "data.val=", "optim.name=adamw")
    old = cfg.replace(**{"method.params.paper_init": False, "optim.adam_beta2": 0.95})
    run_local(old, str(tmp_path / "ckpt"))
    state_file = next((tmp_path / "ckpt").glob("epoch_0001/state.pt"))
    state = torch.load(state_file, weights_only=False)
    del state["config"]["method"]["params"]["paper_init"]  # as the previous version wrote it
    for key in ("lars_eta", "lars_clip", "adam_beta1", "adam_beta2", "clip_mode", "decay_bias_norm"):
        del state["config"]["optim"][key]
    torch.save(state, state_file)

    last, _ = run_local(cfg.replace(**{"train.epochs": 2}), str(tmp_path / "ckpt"))  # today's defaults
    assert last["epoch"] == 2
    out = capsys.readouterr().out
    assert "the checkpoint predates optim.lars_eta" in out and "method.params.paper_init=False" in out
    assert "optim.lars_eta=0.001" in out and "optim.adam_beta2=0.95" in out

    lars = load_config("byol_cifar10")
    kept = as_started(lars, {"optim": {"name": "lars"}, "method": {"params": {}}}, log=lambda m: None)
    assert (kept.optim.lars_eta, kept.optim.lars_clip, kept.method.params.get("paper_init")) == (0.001, False, None)
    assert as_started(lars, lars.to_dict(), log=pytest.fail) == lars  # a checkpoint of this version: as it is


def test_a_checkpoint_of_this_version_resumes_every_recipe_as_it_is():
    """Recipes leave most method params to their builders' defaults (MAE's paper_init): their absence
    from a checkpoint's config must not read as "written before the param existed" (it switched MAE's
    fixed position embedding off on every resume, and its optimizer state then did not fit)."""
    from sslray.config import CONFIG_DIR
    from sslray.raytrain.loop import AS_STARTED, as_started

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path.stem)
        assert as_started(cfg, cfg.to_dict(), log=pytest.fail) == cfg, path.stem
    mae = load_config("mae_cifar10")
    older = mae.to_dict()
    for section, field in {tuple(since.split(".")) for _, _, since in AS_STARTED.values()}:
        del older[section][field]  # as a checkpoint written before all of them
    assert as_started(mae, older, log=lambda m: None).method.params["paper_init"] is False
