"""Fine-tuning's knobs (weight decay, label smoothing, drop path), `--ft-save` and the `linear_sgd`
protocol (frozen backbone, SGD head), on a tiny checkpoint of real CIFAR-10 subsets, in one process."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tiny_checkpoint
from sslray.raytrain import finetune
from sslray.raytrain.finetune import FinetuneSettings, linear_sgd_settings, run_local_finetune

TINY = dict(max_steps=2, batch_size=32, use_gpu="false", train_subset=64, val_subset=40)


def _quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def ckpt(cifar_small, tmp_path_factory) -> dict:
    return tiny_checkpoint(cifar_small, tmp_path_factory.mktemp("ft_knobs_ckpt"), "ft-knobs")


@pytest.fixture
def spy(monkeypatch) -> SimpleNamespace:
    """The loop's classifier (with its weights as built), optimizer and loss calls."""
    seen = SimpleNamespace(nets=[], built=[], opts=[], smoothing=[])
    real_cls, real_opt, real_ce = finetune.Classifier, finetune.make_optimizer, finetune.F.cross_entropy

    def cls(*a):
        net = real_cls(*a)
        seen.nets.append(net)
        seen.built.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return net

    def opt(*a, **k):
        seen.opts.append(real_opt(*a, **k))
        return seen.opts[-1]

    def ce(*a, label_smoothing=0.0, **k):
        seen.smoothing.append(label_smoothing)
        return real_ce(*a, label_smoothing=label_smoothing, **k)

    monkeypatch.setattr(finetune, "Classifier", cls)
    monkeypatch.setattr(finetune, "make_optimizer", opt)
    monkeypatch.setattr(finetune.F, "cross_entropy", ce)
    return seen


def _run(ckpt, cifar_small, s, init="pretrained"):
    return run_local_finetune(str(ckpt["state"]), cifar_small["train"], cifar_small["test"], init, s, printer=_quiet)


def _drop_probs(net) -> list[float]:
    from timm.layers import DropPath

    return [float(m.drop_prob) for m in net.modules() if isinstance(m, DropPath)]


# --- the fine-tune knobs reach the optimizer, the loss and the model --------------------------------------

def test_weight_decay_label_smoothing_and_drop_path_reach_the_run(ckpt, cifar_small, spy, one_thread):
    from sslray.raytrain.evaluate import load_checkpoint

    s = FinetuneSettings(**TINY, weight_decay=0.123, label_smoothing=0.25, drop_path=0.3)
    _run(ckpt, cifar_small, s)
    (net,), (opt,) = spy.nets, spy.opts
    assert isinstance(opt, torch.optim.AdamW)
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.123]  # none on biases and norms
    assert spy.smoothing == [0.25, 0.25]
    probs = _drop_probs(net.backbone)
    assert probs and max(probs) == pytest.approx(0.3)  # timm scales it up to the rate over the blocks
    # the rebuilt backbone starts from the checkpoint's weights, not a fresh init
    _, model, _ = load_checkpoint(ckpt["state"], torch.device("cpu"))
    pre = model.backbone.state_dict()
    assert all(torch.equal(spy.built[0][f"backbone.{k}"], v) for k, v in pre.items())


def test_the_defaults_are_the_earlier_run(ckpt, cifar_small, spy, one_thread):
    _run(ckpt, cifar_small, FinetuneSettings(**TINY))
    assert sorted({g["weight_decay"] for g in spy.opts[0].param_groups}) == [0.0, 0.05]
    assert spy.smoothing == [0.1, 0.1] and not any(_drop_probs(spy.nets[0]))


def test_the_random_init_gets_the_same_drop_path(ckpt, cifar_small, spy, one_thread):
    _run(ckpt, cifar_small, FinetuneSettings(**{**TINY, "max_steps": 1}, drop_path=0.2), init="random_init")
    assert max(_drop_probs(spy.nets[0].backbone)) == pytest.approx(0.2)


# --- linear_sgd: a frozen backbone, the head alone trains --------------------------------------------------

def test_linear_sgd_leaves_the_backbone_bit_identical_and_trains_the_head(ckpt, cifar_small, spy, one_thread):
    s = linear_sgd_settings(FinetuneSettings(**TINY), max_steps=3, batch_size=32, base_lr=0.5)
    m = _run(ckpt, cifar_small, s)
    assert m["step"] == 3 and np.isfinite(m["train_loss"])
    (net,), (opt,), (built,) = spy.nets, spy.opts, spy.built
    after = net.state_dict()
    # every backbone tensor, BatchNorm running statistics and counters included, is as it was built
    bb = [k for k in after if k.startswith("backbone.")]
    assert any("running_mean" in k for k in bb) and any("num_batches_tracked" in k for k in bb)
    changed = [k for k in bb if not torch.equal(after[k], built[k])]
    assert not changed, f"the frozen backbone moved: {changed[:5]}"
    assert not torch.equal(after["head.weight"], built["head.weight"])
    assert not any(p.requires_grad for p in net.backbone.parameters())
    assert isinstance(opt, torch.optim.SGD)
    assert {(g["momentum"], g["weight_decay"]) for g in opt.param_groups} == {(0.9, 0.0)}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in net.head.parameters()}
    assert spy.smoothing == [0.0] * 3


def test_a_frozen_classifier_keeps_its_backbone_in_eval_mode():
    from sslray.raytrain.backbones import create_backbone

    bb = create_backbone("resnet18", cifar_stem_=True)
    net = finetune.Classifier(bb, bb.num_features, 3, True).train()
    assert net.training and net.head.training and not any(m.training for m in net.backbone.modules())
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    net(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())
    assert net.head.weight.grad is not None and all(p.grad is None for p in bb.parameters())
    unfrozen = finetune.Classifier(create_backbone("resnet18"), 512, 3).train()
    assert all(m.training for m in unfrozen.modules())


def test_linear_sgd_settings_are_the_paper_protocol():
    s = linear_sgd_settings(FinetuneSettings(num_workers=4, train_subset=9, save="/x", drop_path=0.1))
    assert (s.freeze_backbone, s.optimizer, s.weight_decay, s.label_smoothing, s.drop_path) == (True, "sgd", 0, 0, 0)
    assert (s.epochs, s.base_lr, s.warmup_epochs, s.views, s.min_scale) == (100, 0.1, 0.0, "mae", 0.08)
    assert (s.num_workers, s.train_subset, s.save, s.protocol) == (4, 9, "", "linear_sgd")


def test_linear_sgd_protocol_names_its_own_metrics_beside_the_baseline(monkeypatch):
    from sslray.eval.protocols import PROTOCOLS, EvalContext, parse_protocols, reads_features

    got = []

    def run(state_path, train, val, init, s):
        got.append((init, s))
        return {"top1": 0.5, "top5": 0.9, "macro_f1": 0.4, "step": 2, "val_images": 30}

    monkeypatch.setattr(finetune, "run_finetune", run)
    store = SimpleNamespace(state_path=Path("/runs/r/state.pt"), train="/data/train", val="/data/val")
    assert parse_protocols("linear,linear_sgd") == ["linear", "linear_sgd"] and not reads_features("linear_sgd")
    r = PROTOCOLS.get("linear_sgd")(EvalContext(store=store, finetune=FinetuneSettings(num_workers=3), log=_quiet))
    assert [i for i, _ in got] == ["pretrained", "random_init"]
    assert all(s.freeze_backbone and s.num_workers == 3 for _, s in got)
    assert r.name == "linear_sgd" and set(r.pretrained) == set(r.random_init) == set(r.gain())
    assert set(r.pretrained) == {"linear_sgd_top1", "linear_sgd_top5", "linear_sgd_macro_f1"}
    got.clear()
    r = PROTOCOLS.get("linear_sgd")(EvalContext(store=store, baseline=False, log=_quiet))
    assert [i for i, _ in got] == ["pretrained"] and r.random_init == {}


# --- --ft-save: the trained classifier, read back ------------------------------------------------------------

def test_ft_save_writes_the_trained_classifier_and_it_loads_back(ckpt, cifar_small, spy, tmp_path, one_thread):
    from sslray.datasets.loader import dataset_info
    from sslray.export import load_backbone
    from sslray.raytrain.finetuned import HEAD_WEIGHTS, load_classifier

    out = tmp_path / "clf"
    out.mkdir()  # an empty folder is taken
    m = _run(ckpt, cifar_small, FinetuneSettings(**TINY, drop_path=0.1, save=str(out)))
    assert sorted(p.name for p in out.iterdir()) == ["backbone.json", "backbone.safetensors", HEAD_WEIGHTS]
    trained = spy.nets[0].eval()
    net, meta = load_classifier(out)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), trained(x))
    assert meta["head"]["classes"] == list(dataset_info(cifar_small["test"]).classes)
    assert meta["which"] == "finetuned" and meta["finetune"]["top1"] == m["top1"]
    assert meta["finetune"]["settings"]["drop_path"] == 0.1 and "drop_path_rate" not in meta["timm_kwargs"]
    backbone, _ = load_backbone(out)  # the export reader takes it as a backbone
    with torch.no_grad():
        assert torch.equal(backbone(x), trained.backbone(x))


def test_ft_save_to_object_storage_uploads_the_classifier_and_it_loads_back(ckpt, cifar_small, spy, s3_server,
                                                                            tmp_path, monkeypatch, one_thread):
    """`--ft-save s3://bucket/clf` on a cluster whose storage is object storage: it was a local folder only."""
    from sslray import storage
    from sslray.raytrain.finetuned import HEAD_WEIGHTS, load_classifier

    monkeypatch.setattr(storage, "cache_root", lambda: tmp_path / "cache")
    out = s3_server.bucket("ftsave") + "/team/clf"
    _run(ckpt, cifar_small, FinetuneSettings(**TINY, save=out))
    assert storage.list_files(out) == sorted(["backbone.json", "backbone.safetensors", HEAD_WEIGHTS])
    net, meta = load_classifier(out)  # read back through the local cache
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), spy.nets[0].eval()(x))
    monkeypatch.setattr(finetune, "finetune_loop", lambda *a: pytest.fail("trained before the check"))
    with pytest.raises(FileExistsError, match=f"{out} already holds files"):  # never over another classifier
        _run(ckpt, cifar_small, FinetuneSettings(**TINY, save=out + "/"))


def test_ft_save_refuses_a_folder_with_files_before_training(ckpt, cifar_small, tmp_path, monkeypatch):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(finetune, "finetune_loop", lambda *a: pytest.fail("trained before the check"))
    with pytest.raises(FileExistsError, match="not an empty folder"):
        _run(ckpt, cifar_small, FinetuneSettings(**TINY, save=str(out)))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_ft_save_keeps_the_pretrained_fit_only(ckpt, cifar_small, tmp_path, one_thread):
    out = tmp_path / "clf"
    _run(ckpt, cifar_small, FinetuneSettings(**{**TINY, "max_steps": 1}, save=str(out)), init="random_init")
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--protocol", "knn", "--ft-save", "{tmp}/clf"], "--ft-save (finetune.save) keeps the finetune protocol's model"),
    (["--protocol", "finetune", "--ft-save", "{tmp}"], "exists and is not an empty folder"),
    (["--protocol", "finetune", "--ft-drop-path", "1.5"], "--ft-drop-path in [0, 1)"),
    (["--protocol", "linear_sgd", "--lin-lr", "0"], "--lin-lr (linear_sgd base_lr) must be above 0"),
])
def test_the_new_flags_are_checked_before_any_work(flags, message, tmp_path, capsys, monkeypatch):
    from sslray.cli import main
    from sslray.eval import features as F

    (tmp_path / "x").write_text("")
    monkeypatch.setattr(F, "FeatureStore", lambda *a, **k: pytest.fail("the checkpoint was opened first"))
    argv = [f.format(tmp=tmp_path) for f in flags]
    assert main(["eval", "--checkpoint", str(tmp_path), "--no-log", *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_cli_flags_reach_the_settings(tmp_path, monkeypatch):
    from sslray.cli import main
    from sslray.eval import runner

    got = {}

    def run_eval(*a, **k):
        got.update(k)
        raise SystemExit(0)

    monkeypatch.setattr(runner, "run_eval", run_eval)
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(tmp_path), "--no-log", "--protocol", "finetune,linear_sgd",
              "--ft-weight-decay", "0.01", "--ft-label-smoothing", "0", "--ft-drop-path", "0.2", "--ft-save",
              str(tmp_path / "o"), "--lin-lr", "0.3", "--lin-epochs", "7", "--lin-max-steps", "5",
              "--lin-batch-size", "64", "--ft-workers", "3"])
    ft, lin = got["finetune"], got["linear_sgd"]
    assert (ft.weight_decay, ft.label_smoothing, ft.drop_path, ft.save) == (0.01, 0.0, 0.2, str(tmp_path / "o"))
    assert dataclasses.replace(lin, base_lr=0.1) == linear_sgd_settings(ft, epochs=7, max_steps=5, batch_size=64)
    assert lin.base_lr == 0.3 and lin.num_workers == 3 and lin.save == ""


def _pretrain_argv(tmp_path, *flags) -> list[str]:
    return ["pretrain", "--recipe", "smoke", "--data", str(tmp_path / "t.beton"), "--val", str(tmp_path / "v.beton"),
            "--storage", str(tmp_path / "runs"), *[f.format(tmp=tmp_path) for f in flags]]


@pytest.mark.parametrize("flags, message", [
    (["--eval", "linear_sgd", "--lin-lr", "0"], "--lin-lr (linear_sgd base_lr) must be above 0"),
    (["--eval", "finetune", "--ft-save", "{tmp}"], "exists and is not an empty folder"),
    (["--eval", "knn", "--ft-save", "{tmp}/clf"], "--ft-save (finetune.save) keeps the finetune protocol's model"),
    (["--eval", "knn", "--knn-k", "0"], "--knn-k (knn_ks) needs neighbour counts of 1 or more"),
    (["--lin-epochs", "7", "--ft-epochs", "2"], "--ft-epochs, --lin-epochs: settings of the --eval protocols, and no "
                                                "--eval was given"),
])
def test_pretrain_checks_its_eval_settings_before_training(flags, message, tmp_path, capsys, monkeypatch):
    """`sslray pretrain --eval linear_sgd --lin-lr 0` used to train for hours first (and had no --lin-* at all)."""
    from sslray.cli import main
    from sslray.raytrain import trainer

    (tmp_path / "x").write_text("")
    monkeypatch.setattr(trainer, "pretrain", lambda *a, **k: pytest.fail("trained before the check"))
    assert main(_pretrain_argv(tmp_path, *flags)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("protocols, settings, message", [
    ("knn", {"knn_k": [5]}, "eval_settings: knn_k is not a protocol setting"),  # a typo of knn_ks
    ("knn", {"baseline": False}, "baseline and the subsets are pretrain's arguments"),
    (None, {"knn_ks": [5]}, "eval_settings are the settings of the evaluate= protocols, and none were given"),
])
def test_the_apis_eval_settings_are_checked_before_training(protocols, settings, message, tmp_path, monkeypatch):
    """`sslray.pretrain(cfg, evaluate="knn", eval_settings={"knn_k": [5]})` failed only after training."""
    import sslray
    from sslray.config import load_config
    from sslray.raytrain import trainer

    monkeypatch.setattr(trainer, "pretrain", lambda *a, **k: pytest.fail("trained before the check"))
    cfg = load_config("smoke", [f"data.train={tmp_path / 't.beton'}", f"data.val={tmp_path / 'v.beton'}",
                                f"ray.storage={tmp_path / 'runs'}"])
    with pytest.raises(ValueError, match=re.escape(message)):
        sslray.pretrain(cfg, evaluate=protocols, eval_settings=settings)


def test_pretrain_eval_flags_reach_the_protocols_on_the_runs_workers_and_subsets(tmp_path, monkeypatch):
    """`sslray pretrain --eval finetune,linear_sgd --lin-epochs 7 ...`: the protocols get `sslray eval`'s
    settings, the Ray-trained ones on the training run's workers, seed and the probe's subsets."""
    from sslray import cli
    from sslray.eval import runner
    from sslray.raytrain import trainer

    res = trainer.PretrainResult("r1", "sqlite:///x.db", str(tmp_path / "ckpt"), {}, "tiny", "")
    monkeypatch.setattr(trainer, "pretrain", lambda cfg, restart=False: res)
    got = {}

    def run_eval(*a, **k):
        got.update(k)
        raise SystemExit(0)

    monkeypatch.setattr(runner, "run_eval", run_eval)
    monkeypatch.setattr("sslray.eval.run_eval", run_eval)
    monkeypatch.setattr("sslray.tracking.Tracker", lambda *a, **k: SimpleNamespace(set_tags=_quiet, end=_quiet))
    with pytest.raises(SystemExit):
        cli.main(_pretrain_argv(tmp_path, "--no-probe", "--eval", "knn,finetune,linear_sgd", "--knn-k", "5",
                                "--lin-epochs", "7", "--ft-epochs", "3", "--ft-drop-path", "0.1",
                                "--probe-train-subset", "120", "train.export_backbone=false", "train.seed=11"))
    ft, lin = got["finetune"], got["linear_sgd"]
    cfg = cli.load_config("smoke")
    assert got["knn_ks"] == [5] and (ft.epochs, ft.drop_path, lin.epochs) == (3, 0.1, 7)
    assert lin.freeze_backbone and lin.base_lr == 0.1  # the paper protocol, with its own budget
    for s in (ft, lin):
        assert (s.num_workers, s.cpus_per_worker, s.seed) == (cfg.ray.num_workers, cfg.ray.cpus_per_worker, 11)
        assert (s.train_subset, s.val_subset) == (120, cfg.data.val_subset) == (got["train_subset"], got["val_subset"])


@pytest.mark.ray
@pytest.mark.slow
def test_ft_save_on_ray_writes_rank_0s_classifier_before_the_run_folder_goes(ray_cluster, ckpt, cifar_small,
                                                                             tmp_path, finetune_folders):
    """Two Ray Train workers: rank 0 puts the classifier in the final checkpoint, the driver copies it to
    --ft-save before the run's temporary folder is removed; read back, it scores the val split as reported."""
    from sslray.datasets.loader import make_loader
    from sslray.datasets.views import eval_transform
    from sslray.eval import run_eval
    from sslray.raytrain.evaluate import load_checkpoint
    from sslray.raytrain.finetune import evaluate_logits
    from sslray.raytrain.finetuned import load_classifier

    made = finetune_folders
    out = tmp_path / "clf"
    s = FinetuneSettings(max_steps=2, batch_size=32, num_workers=2, use_gpu="false", train_subset=128, save=str(out))
    report = run_eval(str(ckpt["run_dir"]), cifar_small["train"], cifar_small["test"], "finetune", use_gpu="false",
                      progress=False, log=_quiet, finetune=s, baseline=False)
    (r,) = report.results
    assert len(made) == 1 and not made[0].exists() and r.info["saved"] == str(out)
    net, meta = load_classifier(out)
    cfg, _, _ = load_checkpoint(ckpt["state"], torch.device("cpu"))
    val = make_loader(cifar_small["test"], 100, train=False, res=cfg.data.decode_res, device=torch.device("cpu"),
                      num_workers=1)
    m = evaluate_logits(net, val, eval_transform(cfg.views), torch.device("cpu"), cfg.train.precision,
                        len(meta["head"]["classes"]))
    assert m["val_images"] == 300 and meta["finetune"]["step"] == 2
    # the ranks scored their slices with the same weights; one image's argmax may tip on summation order
    assert abs(m["top1"] - r.pretrained["finetune_top1"]) <= 1 / 300 + 1e-9
