"""`sslray pretrain --eval linear,knn`: the end-of-run probe and the eval protocols score the same checkpoint,
data, subsets and device, so the frozen features are extracted once and each linear probe is fitted once,
and every figure either of them logs is the one it logs when run alone (`sslray probe`, `sslray eval`)."""

from __future__ import annotations

import shutil

import pytest

from conftest import count_work, tiny_checkpoint
from sslray.eval import features as F
from sslray.eval import run_eval
from sslray.raytrain.evaluate import probe_checkpoint

SUBSETS = {"train_subset": 200, "val_subset": 100}  # small fits: the flow is what is under test


@pytest.fixture(scope="module")
def ckpt(cifar_small, tmp_path_factory) -> dict:
    return tiny_checkpoint(cifar_small, tmp_path_factory.mktemp("reuse_ckpt"), "reuse-tests")


def _quiet(*_a, **_k):
    pass


def _pretrain(ckpt, cifar_small, monkeypatch, eval_protocols):
    """`sslray pretrain` after its training (stubbed: training is tested elsewhere) on ``ckpt``."""
    from sslray.cli import run_pretrain
    from sslray.config import load_config
    from sslray.raytrain import trainer

    res = trainer.PretrainResult(ckpt["run_id"], ckpt["uri"], str(ckpt["state"].parent), {}, "tiny", "")
    monkeypatch.setattr(trainer, "pretrain", lambda cfg, restart=False: res)
    cfg = load_config("smoke", [f"data.train={cifar_small['train']}", f"data.val={cifar_small['test']}",
                                "ray.use_gpu=false", "train.export_backbone=false"])
    return run_pretrain(cfg, probe=True, probe_train_subset=SUBSETS["train_subset"],
                        probe_val_subset=SUBSETS["val_subset"], eval_protocols=eval_protocols)


@pytest.mark.slow  # six small linear probes and three feature passes over 300 images: ~15 s on 2 busy cores
def test_pretrain_with_eval_extracts_features_and_fits_the_linear_probes_once(ckpt, cifar_small, monkeypatch):
    from mlflow.tracking import MlflowClient

    from sslray.config import load_config

    train, val, state = cifar_small["train"], cifar_small["test"], str(ckpt["state"])
    knn_k = load_config("smoke").train.knn_k
    # what `sslray probe` and `sslray eval` report on their own, each with its own features and fits
    alone_probe = probe_checkpoint(state, train, val, knn_k=knn_k, use_gpu="false", log=_quiet, **SUBSETS)
    alone_eval = run_eval(state, train, val, "linear,knn", use_gpu="false", cache=False, progress=False, log=_quiet,
                          **SUBSETS)
    shutil.rmtree(ckpt["state"].parent / "features", ignore_errors=True)  # no cache from another test

    calls = count_work(monkeypatch)
    run = _pretrain(ckpt, cifar_small, monkeypatch, "linear,knn")
    assert calls == {"extract": 4, "fit": 2}  # train + val, pretrained + random init; one fit per init

    assert (run.probe.pretrained, run.probe.random_init) == (alone_probe.pretrained, alone_probe.random_init)
    assert run.probe.probe.report == alone_probe.probe.report
    assert run.eval.metrics() == alone_eval.metrics()
    by = {r.name: r for r in run.eval.results}
    assert by["linear"].texts == {k: v for r in alone_eval.results for k, v in r.texts.items()}
    assert all(not v["from_cache"] and v["path"] for v in run.eval.features.values())

    logged = MlflowClient(tracking_uri=ckpt["uri"]).get_run(ckpt["run_id"]).data.metrics
    for k in ("top1", "top5", "macro_f1"):  # one fit, so one figure under both names
        assert logged[f"probe_linear_{k}"] == logged[f"eval_linear_{k}"] == alone_probe.pretrained[f"linear_{k}"]
        assert logged[f"random_init_linear_{k}"] == logged[f"eval_random_init_linear_{k}"]
    assert logged["probe_knn_top1"] == logged[f"eval_knn_k{knn_k}_top1"]  # the same features, the same k
    client = MlflowClient(tracking_uri=ckpt["uri"])
    assert {"probe/confusion_matrix.png", "probe/classification_report.txt", "probe/retrieval.png"} <= {
        a.path for a in client.list_artifacts(ckpt["run_id"], "probe")}
    assert {"eval/linear/confusion_pretrained.png", "eval/linear/confusion_random_init.png"} <= {
        a.path for a in client.list_artifacts(ckpt["run_id"], "eval/linear")}


@pytest.mark.slow  # two small linear probes: a few seconds
def test_pretrain_without_eval_probes_as_sslray_probe_does(ckpt, cifar_small, monkeypatch):
    shutil.rmtree(ckpt["state"].parent / "features", ignore_errors=True)
    calls = count_work(monkeypatch)
    run = _pretrain(ckpt, cifar_small, monkeypatch, None)
    assert calls == {"extract": 4, "fit": 2} and run.eval is None
    assert not (ckpt["state"].parent / "features").exists()  # no feature cache: the probe keeps nothing


def test_a_store_of_another_split_subset_or_checkpoint_is_refused(ckpt, cifar_small, tmp_path):
    train, val, state = cifar_small["train"], cifar_small["test"], str(ckpt["state"])
    store = F.FeatureStore(state, train, val, use_gpu="false", cache=False, progress=False, log=_quiet, **SUBSETS)
    store.serves(str(ckpt["state"].parent), train, val, use_gpu="false", **SUBSETS)  # its folder names the same file
    with pytest.raises(ValueError, match="another train subset"):
        probe_checkpoint(state, train, val, train_subset=300, val_subset=100, use_gpu="false", store=store)
    with pytest.raises(ValueError, match="val split is"):
        run_eval(state, train, train, "knn", use_gpu="false", store=store, **SUBSETS)
    other = tmp_path / "state.pt"
    shutil.copy2(state, other)
    with pytest.raises(ValueError, match="feature store is of checkpoint"):
        run_eval(str(other), train, val, "knn", use_gpu="false", store=store, **SUBSETS)
    assert not store._mem  # refused before any feature was extracted


def test_only_protocols_that_read_features_share_a_store(ckpt, cifar_small):
    from sslray.eval.runner import shared_store

    args = (str(ckpt["state"]), cifar_small["train"], cifar_small["test"])
    assert shared_store(*args, "finetune", use_gpu="false") is None  # it would write a cache nobody reads
    store = shared_store(*args, "finetune,knn", use_gpu="false", **SUBSETS)
    assert isinstance(store, F.FeatureStore) and len(store.train_idx) == 200 and len(store.val_idx) == 100


def test_a_probe_alone_holds_one_inits_features_at_a_time(ckpt, cifar_small, monkeypatch):
    """`sslray probe` frees the pretrained features before it extracts the random-init ones, as it did
    before it read a FeatureStore (on ImageNet each init's train features are ~10 GB of host memory); a
    store shared with `--eval` keeps them for the protocols."""
    held, real = [], F.FeatureStore._extract

    def extract(self, init):
        held.append((init, sorted(self._mem)))
        return real(self, init)

    monkeypatch.setattr(F.FeatureStore, "_extract", extract)
    probe_checkpoint(str(ckpt["state"]), cifar_small["train"], cifar_small["test"], use_gpu="false", log=_quiet,
                     **SUBSETS)
    assert held == [("pretrained", []), ("random_init", [])]
