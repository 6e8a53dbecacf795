"""`sslray export` / `load_backbone`: a checkpoint's backbone as safetensors + JSON that rebuilds
the same module, with sslray or with timm alone; the EMA teacher on request; clear errors that
never overwrite an earlier export."""

from __future__ import annotations

import json

import pytest
import torch

from sslray.cli import main
from sslray.config import load_config
from sslray.export import META, WEIGHTS, export_backbone, load_backbone
from sslray.raytrain.methods import METHODS, create_method

SMALL = {"model.backbone": "resnet10t", "model.cifar_stem": False, "model.proj_hidden_dim": 32,
         "model.proj_out_dim": 16}


def _checkpoint(tmp_path, recipe, overrides, epoch=3, perturb=None):
    """A state.pt as the loop writes it (config, model, epoch, step) for a freshly built method."""
    cfg = load_config(recipe, overrides)
    torch.manual_seed(0)
    model = create_method(cfg)
    if perturb:
        perturb(model)
    folder = tmp_path / "run" / f"epoch_{epoch:04d}"
    folder.mkdir(parents=True)
    torch.save({"config": cfg.to_dict(), "model": model.state_dict(), "epoch": epoch, "step": 10 * epoch},
               folder / "state.pt")
    return model.eval(), folder


def _same_features(a, b, size=32):
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_cifar_stem_backbone_round_trips_exactly(tmp_path):
    over = {**SMALL, "model.backbone": "resnet18", "model.cifar_stem": True}
    model, _ = _checkpoint(tmp_path, "simclr_cifar10", over, epoch=3)
    out = export_backbone(tmp_path / "run", tmp_path / "exp")  # a run folder: its newest checkpoint
    loaded, meta = load_backbone(out)
    _same_features(loaded, model.backbone)
    assert loaded.conv1.kernel_size == (3, 3) and isinstance(loaded.maxpool, torch.nn.Identity)
    assert (meta["backbone"], meta["cifar_stem"], meta["method"]) == ("resnet18", True, "simclr")
    assert meta["which"] == "student"
    assert (meta["epoch"], meta["step"], meta["num_features"], meta["input_size"]) == (3, 30, 512, 32)
    assert meta["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert meta["checkpoint"].endswith("epoch_0003/state.pt")
    # the weights file alone also finds its metadata beside it
    _same_features(load_backbone(out / WEIGHTS)[0], model.backbone)


@pytest.mark.parametrize("name", ["resnet18", "resnet10t", "resnet18d"])
def test_cifar_stem_keeps_32px_inputs_at_32px_into_layer1_for_plain_and_deep_stems(name):
    from sslray.raytrain.backbones import create_backbone

    plain = create_backbone(name)
    small = create_backbone(name, cifar_stem_=True)
    x = torch.rand(2, 3, 32, 32)
    seen = {}
    small.layer1.register_forward_hook(lambda m, i, o: seen.update(small=o.shape[-1]))
    plain.layer1.register_forward_hook(lambda m, i, o: seen.update(plain=o.shape[-1]))
    assert small(x).shape == plain(x).shape == (2, plain.num_features)
    assert (seen["plain"], seen["small"]) == (8, 32)
    if isinstance(small.conv1, torch.nn.Sequential):  # a deep stem keeps its three convs
        assert len(small.conv1) == len(plain.conv1)


def test_a_deep_stem_cifar_backbone_round_trips(tmp_path):
    model, _ = _checkpoint(tmp_path, "simclr_cifar10", {**SMALL, "model.cifar_stem": True})  # resnet10t
    loaded, meta = load_backbone(export_backbone(tmp_path / "run", tmp_path / "exp"))
    _same_features(loaded, model.backbone)
    assert meta["cifar_stem"] is True and loaded.conv1[0].stride == (1, 1)


def test_plain_timm_loads_the_export_without_sslray_code(tmp_path):
    import timm
    from safetensors.torch import load_file

    model, _ = _checkpoint(tmp_path, "simclr_cifar10", SMALL)
    out = export_backbone(tmp_path / "run", tmp_path / "exp")
    meta = json.loads((out / META).read_text())
    plain = timm.create_model(meta["backbone"], num_classes=0, **meta["timm_kwargs"])
    plain.load_state_dict(load_file(str(out / WEIGHTS)), strict=True)
    _same_features(plain, model.backbone)


def test_a_vit_with_its_own_patch_size_rebuilds(tmp_path):
    """MAE rebuilds its ViT with a CIFAR patch size; the export records it in timm_kwargs."""
    over = {"model.backbone": "vit_tiny_patch16_224", "method.params.patch_size": 8, "method.params.decoder_dim": 32,
            "method.params.decoder_depth": 1, "method.params.decoder_heads": 2}
    model, _ = _checkpoint(tmp_path, "mae_cifar10", over)
    out = export_backbone(tmp_path / "run", tmp_path / "exp")
    loaded, meta = load_backbone(out)
    assert meta["timm_kwargs"] == {"img_size": 32, "patch_size": 8}
    _same_features(loaded, model.backbone)


def test_teacher_is_the_ema_copy_and_student_the_online_network(tmp_path):
    def drift(model):  # the EMA copy has moved away from the student, as after training
        with torch.no_grad():
            for p in model.target.module[0].parameters():
                p.add_(0.05)

    model, _ = _checkpoint(tmp_path, "byol_cifar10", {**SMALL, "method.params.pred_hidden_dim": 32}, perturb=drift)
    student = load_backbone(export_backbone(tmp_path / "run", tmp_path / "s"))[0]
    teacher, meta = load_backbone(export_backbone(tmp_path / "run", tmp_path / "t", which="teacher"))
    assert meta["which"] == "teacher"
    _same_features(student, model.backbone)
    _same_features(teacher, model.target.module[0])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(student(x), teacher(x))


def test_errors_name_the_problem_and_keep_an_earlier_export(tmp_path, capsys):
    model, _ = _checkpoint(tmp_path, "simclr_cifar10", SMALL)
    out = tmp_path / "exp"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "simclr student backbone resnet10t (epoch 3, 512 features)" in printed and "load_backbone" in printed
    before = {n: (out / n).read_bytes() for n in (WEIGHTS, META)}

    assert main(["export", str(tmp_path / "run"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "--force" in err
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "t"), "--teacher"]) == 2
    assert "method 'simclr' has no EMA teacher" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "no checkpoint (state.pt) under" in capsys.readouterr().err
    assert {n: (out / n).read_bytes() for n in (WEIGHTS, META)} == before  # nothing was overwritten
    assert not list(out.glob("*.tmp"))
    assert main(["export", str(tmp_path / "run"), str(out), "--force"]) == 0

    (out / META).write_text("{not json")
    with pytest.raises(ValueError, match=r"backbone\.json is not valid JSON"):
        load_backbone(out)
    (out / META).write_text(json.dumps({"backbone": "resnet10t"}))
    with pytest.raises(ValueError, match="not an sslray backbone export"):
        load_backbone(out)
    (out / META).unlink()  # the weights file alone rebuilds from the metadata in its own header
    _same_features(load_backbone(out)[0], model.backbone)
    assert load_backbone(out / WEIGHTS)[1]["backbone"] == "resnet10t"
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(out / WEIGHTS)), str(out / WEIGHTS))  # weights without the header metadata
    with pytest.raises(FileNotFoundError, match=r"backbone\.json not found, and .*backbone\.safetensors carries no "
                                                r"sslray metadata"):
        load_backbone(out)
    (out / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=r"backbone\.safetensors not found"):
        load_backbone(out)


def test_a_missing_path_never_loads_the_parent_folders_export_and_the_json_path_loads(tmp_path):
    model, _ = _checkpoint(tmp_path, "simclr_cifar10", SMALL)
    out = export_backbone(tmp_path / "run", tmp_path / "models")
    with pytest.raises(FileNotFoundError, match=r"load_backbone: .*models/v2 not found"):
        load_backbone(out / "v2")  # a typo'd or missing subfolder: the export one level up is not it
    _same_features(load_backbone(out / META)[0], model.backbone)


def test_init_weights_take_sslray_own_checkpoint(tmp_path):
    """A state.pt holds the whole method (heads, teacher, optimizer, RNG states as numpy arrays): its
    student backbone is the one taken, from the file, its checkpoint folder or its run folder."""
    import numpy as np

    from sslray.export import init_backbone

    over = {**SMALL, "method.params.pred_hidden_dim": 32}
    source, folder = _checkpoint(tmp_path, "byol_cifar10", over)
    state = torch.load(folder / "state.pt", weights_only=False)
    torch.save({**state, "rng": {"numpy": np.random.get_state()}}, folder / "state.pt")  # as the loop saves it
    for given in (folder / "state.pt", folder, tmp_path / "run"):
        torch.manual_seed(123)
        fresh = create_method(load_config("byol_cifar10", over))
        assert init_backbone(fresh, given) == ["backbone", "teacher backbone"], given
        _same_features(fresh.backbone, source.backbone)


def test_exports_of_one_checkpoint_are_byte_identical(tmp_path):
    """Same checkpoint, same bytes: content hashes, caches and artifact stores see one file (safetensors
    writes a multi-key header in a random order, so the metadata is one key)."""
    _checkpoint(tmp_path, "simclr_cifar10", SMALL)
    outs = [export_backbone(tmp_path / "run", tmp_path / f"exp{i}") for i in range(4)]
    for name in (WEIGHTS, META):
        assert len({(o / name).read_bytes() for o in outs}) == 1, name


def test_init_weights_start_the_backbone_and_the_teacher_from_an_export(tmp_path):
    from sslray.export import init_backbone

    over = {**SMALL, "method.params.pred_hidden_dim": 32}
    source, _ = _checkpoint(tmp_path, "byol_cifar10", over)
    out = export_backbone(tmp_path / "run", tmp_path / "exp")
    torch.manual_seed(123)  # another init than the source's
    fresh = create_method(load_config("byol_cifar10", over))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(fresh.backbone.eval()(x), source.backbone(x))
    assert init_backbone(fresh, out) == ["backbone", "teacher backbone"]
    _same_features(fresh.backbone, source.backbone)
    _same_features(fresh.target.module[0], source.backbone)  # the EMA teacher starts equal to the student


def test_init_weights_take_a_classifier_checkpoint_and_name_what_does_not_fit(tmp_path):
    """An ImageNet-style timm checkpoint (a ``state_dict`` entry, a classifier ``fc``) loads into the
    backbone with the classifier dropped; a file for another stem fails naming the file and the key."""
    import timm

    from sslray.export import init_backbone

    clf = timm.create_model("resnet10t", num_classes=10)
    torch.save({"state_dict": clf.state_dict(), "epoch": 90}, tmp_path / "imagenet.pth")
    model = create_method(load_config("simclr_cifar10", SMALL))
    init_backbone(model, tmp_path / "imagenet.pth")
    clf.reset_classifier(0)
    _same_features(model.backbone, clf)

    # other tools' wrappings of the same backbone: DDP's module., MoCo's encoder_q. beside its key encoder
    enc = {k: v for k, v in clf.state_dict().items()}
    for i, wrapped in enumerate(({f"module.{k}": v for k, v in enc.items()},
                                 {**{f"module.encoder_q.{k}": v for k, v in enc.items()},
                                  **{f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in enc.items()},
                                  "module.queue": torch.zeros(8, 4)})):
        torch.save({"state_dict": wrapped}, tmp_path / f"wrapped{i}.pth")
        again = create_method(load_config("simclr_cifar10", SMALL))
        init_backbone(again, tmp_path / f"wrapped{i}.pth")
        _same_features(again.backbone, clf)

    stem = create_method(load_config("simclr_cifar10",
                                     {**SMALL, "model.backbone": "resnet18", "model.cifar_stem": True}))
    torch.save(stem.backbone.state_dict(), tmp_path / "cifar_stem.pt")
    plain = create_method(load_config("simclr_cifar10", {**SMALL, "model.backbone": "resnet18"}))
    with pytest.raises(ValueError, match=r"cifar_stem\.pt does not fit backbone ResNet .*shape: conv1\.weight"):
        init_backbone(plain, tmp_path / "cifar_stem.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt is not a weights file"):
        init_backbone(plain, tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ValueError, match=r"junk\.safetensors is not a weights file"):
        init_backbone(plain, tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model.init_weights: .*nowhere"):
        init_backbone(plain, tmp_path / "nowhere")


def test_pretrain_rejects_a_misfit_init_file_before_ray_starts(tmp_path, capsys):
    import ray

    stem = create_method(load_config("simclr_cifar10", {**SMALL, "model.backbone": "resnet18"}))
    torch.save(stem.backbone.state_dict(), tmp_path / "r18.pt")
    was_up = ray.is_initialized()
    rc = main(["pretrain", "--recipe", "smoke", "--data", str(tmp_path / "train.beton"), "--backbone", "resnet10t",
               "--init-weights", str(tmp_path / "r18.pt"), "--storage", str(tmp_path / "runs")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "sslray pretrain: error: model.init_weights:" in err and "r18.pt does not fit backbone" in err
    assert ray.is_initialized() == was_up and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", sorted(METHODS.names()))
def test_every_method_exports_a_backbone_that_rebuilds(name, tmp_path):
    """Each method's tiny test build (ResNets, and ViTs for MAE and VICRegL) round-trips through the
    export with the features of its own backbone."""
    import test_methods as T

    cfg = T.tiny_cfg(name)
    torch.manual_seed(0)
    model = create_method(cfg).eval()
    folder = tmp_path / "run" / "epoch_0001"
    folder.mkdir(parents=True)
    torch.save({"config": cfg.to_dict(), "model": model.state_dict(), "epoch": 1, "step": 1}, folder / "state.pt")
    loaded, meta = load_backbone(export_backbone(tmp_path / "run", tmp_path / "exp"))
    assert meta["method"] == name and meta["num_features"] == model.backbone.num_features
    _same_features(loaded, model.backbone, cfg.views.crop_size)


def test_export_after_training_logs_both_files_and_never_fails_the_run(tmp_path):
    from sslray.export import export_after_training

    class Tracker:
        def __init__(self):
            self.logged = []

        def log_artifact(self, path, subdir=None):
            self.logged.append((path.name, subdir))

    _, ckpt = _checkpoint(tmp_path, "simclr_cifar10", SMALL)
    lines, t = [], Tracker()
    out = export_after_training(str(ckpt), t, log=lines.append)
    assert out == str(ckpt.parent / "backbone") and t.logged == [(WEIGHTS, "backbone"), (META, "backbone")]
    assert load_backbone(out)[1]["epoch"] == 3 and "backbone exported to" in lines[-1]
    assert export_after_training(str(ckpt), t, log=lines.append) == out  # a resumed run's later export replaces it

    (ckpt / "state.pt").write_bytes(b"damaged")
    assert export_after_training(str(ckpt), Tracker(), log=lines.append) is None
    assert "warning: backbone export failed" in lines[-1] and "sslray export" in lines[-1]
    assert export_after_training(None, Tracker(), log=lines.append) is None
    assert "no checkpoint" in lines[-1]


def test_a_resumed_run_no_longer_needs_its_init_file(tmp_path, monkeypatch):
    """`sslray pretrain` checks --init-weights before a fresh run, naming a missing file; a run that
    resumes (its run file is in storage) takes its weights from its checkpoint and starts without it."""
    from sslray import cli, tracking
    from sslray.raytrain import runfolder, trainer

    cfg = load_config("smoke", {"model.init_weights": str(tmp_path / "gone.pt"), "ray.name": "r",
                                "ray.storage": str(tmp_path / "runs"), "train.export_backbone": False})
    started = []
    monkeypatch.setattr(trainer, "pretrain", lambda c, restart=False: started.append(restart) or
                        trainer.PretrainResult("id", "uri", None, {}, "r", str(tmp_path / "runs")))
    monkeypatch.setattr(tracking, "Tracker", lambda *a, **k: type("T", (), {"end": lambda self: None})())
    with pytest.raises(FileNotFoundError, match=r"model.init_weights: .*gone\.pt not found"):
        cli.run_pretrain(cfg, probe=False)
    assert started == []

    (tmp_path / "runs" / "r").mkdir(parents=True)
    runfolder.write_run_file(str(tmp_path / "runs" / "r"), {"run_id": "x", "tracking_uri": "sqlite:///m.db"})
    assert runfolder.resumes(cfg) and not runfolder.resumes(cfg, restart=True)
    cli.run_pretrain(cfg, probe=False)
    assert started == [False]
    with pytest.raises(FileNotFoundError, match=r"gone\.pt"):  # --restart starts over: the file is needed again
        cli.run_pretrain(cfg, probe=False, restart=True)
