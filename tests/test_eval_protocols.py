"""Eval protocols on real CIFAR-10 subsets: features cached per checkpoint, linear / kNN / low-shot /
t-SNE beside the random-init baseline, logged to the pretraining run; fine-tune vs scratch on Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_checkpoint
from sslray.eval import features as F
from sslray.eval import find_run, log_eval, parse_protocols, run_eval, stratified_indices
from sslray.eval.lowshot import fraction_label, per_class_count

pytest_plugins = ["conftest_runs"]


@pytest.fixture(scope="module")
def tiny_ckpt(cifar_small, tmp_path_factory) -> dict:
    return tiny_checkpoint(cifar_small, tmp_path_factory.mktemp("eval_ckpt"), "eval-tests")


def _quiet(*_a, **_k):
    pass


def _eval(tiny_ckpt, cifar_small, protocols, **kw):
    return run_eval(str(tiny_ckpt["run_dir"]), cifar_small["train"], cifar_small["test"], protocols, use_gpu="false",
                    progress=False, log=_quiet, **kw)


# --- stratified, seeded subsets ---------------------------------------------------------------------

def test_stratified_subsets_are_seeded_and_exact_per_class(cifar_small):
    """Real CIFAR labels (100 per class): exact per-class counts; same seed same indices, other seed other."""
    from sslray.datasets.resident import load_beton

    _, labels, _ = load_beton(cifar_small["train"], 32)
    labels = np.asarray(labels)
    for fraction, per_class in ((0.01, 1), (0.1, 10), (0.25, 25), (1.0, 100)):
        a = stratified_indices(labels, fraction, seed=0)
        assert np.array_equal(a, stratified_indices(labels, fraction, seed=0))
        assert len(np.unique(a)) == len(a) and np.all(np.diff(a) > 0)
        assert np.bincount(labels[a], minlength=10).tolist() == [per_class] * 10
        if fraction < 1:
            assert not np.array_equal(a, stratified_indices(labels, fraction, seed=1))
            assert not np.array_equal(stratified_indices(labels, fraction, 1), stratified_indices(labels, fraction, 2))
        else:
            assert np.array_equal(a, np.arange(len(labels)))


def test_stratified_subsets_on_unbalanced_classes():
    labels = np.array([0] * 7 + [1] * 200 + [2] * 31)
    idx = stratified_indices(labels, 0.1, seed=3)
    assert np.bincount(labels[idx]).tolist() == [per_class_count(7, 0.1), 20, 3] == [1, 20, 3]
    # a class's draw does not depend on the other classes
    other = stratified_indices(np.array([0] * 7 + [1] * 5 + [2] * 31), 0.1, seed=3)
    assert set(idx[labels[idx] == 0]) == set(other[other < 7])
    with pytest.raises(ValueError, match="fraction"):
        per_class_count(10, 0.0)
    assert [fraction_label(f) for f in (0.01, 0.1, 1.0, 0.005)] == ["1pct", "10pct", "100pct", "0_5pct"]


# --- bad input ----------------------------------------------------------------------------------------

def test_unknown_protocol_names_the_known_ones():
    assert parse_protocols("linear, knn,linear") == ["linear", "knn"]
    known = "embed, finetune, knn, linear, linear_sgd, lowshot"
    with pytest.raises(ValueError, match=rf"unknown eval protocol 'bogus'.*{known}"):
        parse_protocols("linear,bogus")


def test_cli_rejects_unknown_protocol_and_missing_checkpoint(tmp_path, capsys):
    from sslray.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path), "--protocol", "linear,tsne"]) == 2
    assert "unknown eval protocol 'tsne'" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert main(["eval", "--checkpoint", str(missing), "--protocol", "knn", "--no-log"]) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--protocol", "knn", "--knn-k", "10,0"], "--knn-k (knn_ks) needs neighbour counts of 1 or more, got [10, 0]"),
    (["--protocol", "knn", "--knn-k", "ten"], "--knn-k 'ten': expected a comma list of ints"),
    (["--protocol", "lowshot", "--lowshot-seeds", ""], "--lowshot-seeds (lowshot_seeds) needs at least one seed"),
    (["--protocol", "lowshot", "--lowshot-fractions", "0,1"], "--lowshot-fractions (lowshot_fractions) needs label "
                                                              "fractions in (0, 1], got [0.0, 1.0]"),
])
def test_eval_options_are_checked_before_any_work(flags, message, tmp_path, capsys, monkeypatch):
    from sslray.cli import main

    monkeypatch.setattr(F, "FeatureStore", lambda *a, **k: pytest.fail("the checkpoint was opened first"))
    assert main(["eval", "--checkpoint", str(tmp_path), "--no-log", *flags]) == 2
    assert message in capsys.readouterr().err


def test_gains_leave_out_spreads_and_counts():
    from sslray.eval.protocols import ProtocolResult

    side = {"lowshot_1pct_top1_mean": 0.5, "lowshot_1pct_top1_std": 0.1, "lowshot_1pct_runs": 3}
    r = ProtocolResult("lowshot", side, {**side, "lowshot_1pct_top1_mean": 0.3})
    assert r.gain() == {"lowshot_1pct_top1_mean": pytest.approx(0.2)}


def test_an_image_folder_split_gets_a_new_cache_key_when_an_image_inside_changes(cifar_small, tmp_path):
    """A folder's own mtime and size stay the same when an image inside a class folder is replaced."""
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(cifar_small["test_tree"], tree)
    before = F._file_id(str(tree))
    img = sorted((tree / "cat").iterdir())[0]
    st = tree.stat()
    img.write_bytes(sorted((tree / "dog").iterdir())[0].read_bytes())
    os.utime(tree, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert F._file_id(str(tree)) != before and F._file_id(str(tree))["path"] == before["path"]


def test_unlabelled_val_split_is_refused_by_name(tiny_ckpt, cifar_small, tmp_path):
    beton = tmp_path / "unlabelled.beton"
    beton.write_bytes(b"\0" * 16)
    (tmp_path / "unlabelled.manifest.json").write_text(json.dumps(
        {"num_images": 4, "classes": [], "beton_bytes": 16}))
    with pytest.raises(F.DataError, match=f"val split {beton} has no class labels"):
        run_eval(str(tiny_ckpt["state"]), cifar_small["train"], str(beton), "knn", use_gpu="false", log=_quiet)


# --- the feature cache ------------------------------------------------------------------------------

def test_features_are_extracted_once_per_checkpoint(tiny_ckpt, cifar_small, monkeypatch):
    import torch

    calls = []
    real = F.extract_features
    monkeypatch.setattr(F, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = _eval(tiny_ckpt, cifar_small, "knn")
    assert len(calls) == 4  # train + val, pretrained + random init
    paths = {init: Path(v["path"]) for init, v in first.features.items()}
    assert all(p.exists() and p.parent == tiny_ckpt["state"].parent / "features" for p in paths.values())
    assert not any(v["from_cache"] for v in first.features.values())

    def boom(*a, **k):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(F, "extract_features", boom)
    second = _eval(tiny_ckpt, cifar_small, "knn")
    assert all(v["from_cache"] for v in second.features.values())
    assert second.results[0].pretrained == first.results[0].pretrained  # same arrays, same kNN numbers

    # a changed eval transform or checkpoint mtime is a different cache entry
    store = F.FeatureStore(str(tiny_ckpt["state"]), cifar_small["train"], cifar_small["test"], use_gpu="false",
                           log=_quiet)
    key = store.key("pretrained")[0]
    assert store.key("random_init")[0] != key
    # features computed in another precision or on another device are another entry
    cpu, fp32 = store.device, store.cfg
    store.cfg = fp32.replace(**{"train.precision": "bf16"})  # bf16 autocast on the CPU
    assert store.key("pretrained")[0] != key
    store.cfg, store.device = fp32.replace(**{"train.precision": "fp32"}), torch.device("meta")
    assert store.key("pretrained")[0] != key
    store.device = cpu
    assert store.key("pretrained")[0] == key
    st = tiny_ckpt["state"].stat()
    try:
        os.utime(tiny_ckpt["state"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert F.FeatureStore(str(tiny_ckpt["state"]), cifar_small["train"], cifar_small["test"], use_gpu="false",
                              log=_quiet).key("pretrained")[0] != key
    finally:
        os.utime(tiny_ckpt["state"], ns=(st.st_atime_ns, st.st_mtime_ns))


def test_pretrained_features_come_from_the_checkpoint_and_the_baseline_from_a_fresh_init(tiny_ckpt, cifar_small):
    """Every reported gain compares these two: a store that built the pretrained backbone without the
    checkpoint's weights (or the baseline with them) would make the gains meaningless."""
    import numpy as np
    import torch

    from sslray.config import from_dict
    from sslray.raytrain.methods import create_method

    store = F.FeatureStore(str(tiny_ckpt["state"]), cifar_small["train"], cifar_small["test"], val_subset=40,
                           train_subset=40, use_gpu="false", cache=False, progress=False, log=_quiet)
    state = torch.load(tiny_ckpt["state"], weights_only=False)
    by_hand = create_method(from_dict(state["config"]))
    by_hand.load_state_dict(state["model"])
    want, _ = store._split(by_hand.backbone.eval(), store.val, store.val_idx, "by hand")
    pretrained, random_init = store.get("pretrained").val_x, store.get("random_init").val_x
    np.testing.assert_allclose(pretrained, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(random_init, want, atol=1e-3), "the baseline used the checkpoint's weights"


def test_cli_eval_prints_the_table_and_logs_to_the_run_it_finds(tiny_ckpt, cifar_small, capsys):
    from mlflow.tracking import MlflowClient

    from sslray.cli import main

    rc = main(["eval", "--checkpoint", str(tiny_ckpt["run_dir"]), "--train", cifar_small["train"], "--val",
               cifar_small["test"], "--protocol", "knn", "--knn-k", "10,20", "--gpu", "false"])
    out = capsys.readouterr().out
    assert rc == 0 and "knn_k20_top1" in out and "random init" in out and "knn_k100" not in out
    assert f"logged to MLflow run {tiny_ckpt['run_id']}" in out
    run = MlflowClient(tracking_uri=tiny_ckpt["uri"]).get_run(tiny_ckpt["run_id"])
    assert {"eval_knn_k10_top1", "eval_random_init_knn_k20_top5", "eval_gain_knn_k20_top1"} <= set(run.data.metrics)
    assert run.data.tags["sslray.eval_protocols"] == "knn"


def test_pretrain_eval_option_runs_the_protocols_on_the_final_checkpoint(tiny_ckpt, cifar_small, monkeypatch):
    """`sslray pretrain --eval knn`: after training, the protocols run on the returned checkpoint and land
    in the training run before it is marked finished (training itself is stubbed: its tests are elsewhere)."""
    from mlflow.tracking import MlflowClient

    from sslray.cli import run_pretrain
    from sslray.config import load_config
    from sslray.raytrain import trainer

    res = trainer.PretrainResult(tiny_ckpt["run_id"], tiny_ckpt["uri"], str(tiny_ckpt["state"].parent), {}, "tiny", "")
    monkeypatch.setattr(trainer, "pretrain", lambda cfg, restart=False: res)
    cfg = load_config("smoke", [f"data.train={cifar_small['train']}", f"data.val={cifar_small['test']}",
                                "ray.use_gpu=false"])
    run_pretrain(cfg, probe=False, eval_protocols="knn")
    run = MlflowClient(tracking_uri=tiny_ckpt["uri"]).get_run(tiny_ckpt["run_id"])
    assert "eval_knn_k200_top1" in run.data.metrics and run.info.status == "FINISHED"


# --- protocols on real CIFAR-10 ---------------------------------------------------------------------

@pytest.mark.slow  # two linear probes to convergence: ~15-30 s on 2 busy cores
def test_knn_linear_embed_log_to_the_pretraining_run(tiny_ckpt, cifar_small, tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    report = _eval(tiny_ckpt, cifar_small, "linear,knn,embed")
    by = {r.name: r for r in report.results}
    assert list(by) == ["linear", "knn", "embed"]
    for k in (10, 20, 100, 200):
        for init in (by["knn"].pretrained, by["knn"].random_init):
            assert 0 <= init[f"knn_k{k}_top1"] <= init[f"knn_k{k}_top5"] <= 1
    assert set(by["linear"].pretrained) == {"linear_top1", "linear_top5", "linear_macro_f1", "linear_precision",
                                            "linear_recall"}
    assert by["linear"].info["train_images"] == 1000 and by["linear"].info["val_images"] == 300
    assert -1 <= by["embed"].pretrained["embed_silhouette"] <= 1

    run = find_run(str(tiny_ckpt["state"]))
    assert run["run_id"] == tiny_ckpt["run_id"]
    from sslray.tracking import Tracker

    log_eval(Tracker(run["tracking_uri"], run["run_id"]), report)
    c = MlflowClient(tracking_uri=tiny_ckpt["uri"])
    m = c.get_run(tiny_ckpt["run_id"]).data.metrics
    assert m["eval_knn_k20_top1"] == by["knn"].pretrained["knn_k20_top1"]
    assert m["eval_random_init_linear_top1"] == by["linear"].random_init["linear_top1"]
    assert m["eval_gain_linear_top1"] == pytest.approx(m["eval_linear_top1"] - m["eval_random_init_linear_top1"])
    png = Path(c.download_artifacts(tiny_ckpt["run_id"], "eval/embed/tsne.png", str(tmp_path)))
    img = np.asarray(Image.open(png).convert("L"))
    assert img.shape[0] > 200 and img.std() > 10  # a drawn scatter, not a blank canvas
    summary = json.loads(Path(c.download_artifacts(tiny_ckpt["run_id"], "eval/summary.json", str(tmp_path))).read_text())
    assert set(summary["protocols"]) == {"linear", "knn", "embed"}


@pytest.mark.slow  # 14 probes
def test_lowshot_probes_on_real_cifar(tiny_ckpt, cifar_small):
    report = _eval(tiny_ckpt, cifar_small, "lowshot")
    (r,) = report.results
    for side in (r.pretrained, r.random_init):
        for lab, runs in (("1pct", 3), ("10pct", 3), ("100pct", 1)):
            assert side[f"lowshot_{lab}_runs"] == runs
            assert 0 <= side[f"lowshot_{lab}_top1_mean"] <= 1 and side[f"lowshot_{lab}_top1_std"] >= 0
        assert side["lowshot_100pct_top1_std"] == 0.0
    # 100 train images per class: 1 -> 10 images, 10% -> 100, 100% -> 1000, one subset per seed
    assert r.info["subsets"] == {**{f"1pct_seed{s}": 10 for s in (0, 1, 2)},
                                 **{f"10pct_seed{s}": 100 for s in (0, 1, 2)}, "100pct_seed0": 1000}
    assert "lowshot_1pct_top1_std" not in r.gain() and "lowshot_1pct_top1_mean" in r.gain()
    from sslray.eval import format_eval_table

    table = format_eval_table(report, markdown=True)
    assert "lowshot_10pct_top1" in table and "±" in table


# --- fine-tuning --------------------------------------------------------------------------------------

def test_layer_decay_scales_vit_blocks_and_leaves_resnets_alone():
    from sslray.raytrain.backbones import create_backbone
    from sslray.raytrain.finetune import Classifier, layer_decay_groups

    vit = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    groups = layer_decay_groups(Classifier(vit, vit.num_features, 10), 0.05, 0.5)
    scale = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scale == {0: 0.5**4, 1: 0.5**3, 2: 0.5**2, 3: 0.5, 4: 1.0}
    assert sum(len(g["params"]) for g in groups) == len(list(vit.parameters())) + 2
    assert all(g["weight_decay"] == 0 for g in groups if any(p.ndim <= 1 for p in g["params"]))
    rn = create_backbone("resnet18")
    assert {g["lr_scale"] for g in layer_decay_groups(Classifier(rn, rn.num_features, 10), 0.05, 0.5)} == {1.0}


def test_finetune_macro_f1_scores_the_classes_the_val_set_holds():
    from sslray.raytrain.finetune import classification_metrics

    y = np.repeat(np.arange(5), 3)  # a val subset holding 5 of 10 classes, every image right
    m = classification_metrics(np.eye(10)[y], y, 10)
    assert m["top1"] == 1.0 and m["macro_f1"] == 1.0


def test_finetune_workers_get_the_checkpoints_uri_not_this_machines_copy(tmp_path, monkeypatch):
    """Ray workers on other nodes have no copy of a bucket checkpoint in this machine's cache: they get
    its URI and fetch it themselves; a local checkpoint is handed over as its path."""
    from types import SimpleNamespace

    from sslray import storage
    from sslray.eval.protocols import PROTOCOLS, EvalContext
    from sslray.raytrain import finetune

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    handed = []

    def compare(state_path, train, val, s, log=print):
        handed.append(state_path)
        scores = {"finetune_top1": 0.5, "finetune_top5": 0.9, "finetune_macro_f1": 0.4}
        return {"pretrained": scores, "random_init": scores, "info": {}}

    monkeypatch.setattr(finetune, "finetune_compare", compare)
    uri = "s3://bkt/runs/r1/epoch_0002/state.pt"
    local = tmp_path / "runs" / "r1" / "epoch_0002" / "state.pt"
    for state_path in (storage.local_mirror(uri), local):
        store = SimpleNamespace(state_path=state_path, train="/data/train", val="/data/val")
        PROTOCOLS.get("finetune")(EvalContext(store=store, log=_quiet))
    assert handed == [uri, str(local)]


def test_finetune_loop_runs_in_one_process(tiny_ckpt, cifar_small):
    from sslray.raytrain.finetune import FinetuneSettings, run_local_finetune

    s = FinetuneSettings(max_steps=2, batch_size=32, use_gpu="false", train_subset=128, views="mae")
    m = run_local_finetune(str(tiny_ckpt["state"]), cifar_small["train"], cifar_small["test"], "pretrained", s,
                           printer=_quiet)
    assert m["step"] == 2 and m["val_images"] == 300 and np.isfinite(m["train_loss"])
    assert 0 <= m["top1"] <= m["top5"] <= 1 and 0 <= m["macro_f1"] <= 1


@pytest.mark.ray
@pytest.mark.slow
def test_finetune_against_scratch_on_ray(ray_cluster, tiny_ckpt, cifar_small, tmp_path, monkeypatch,
                                         finetune_folders):
    from sslray.raytrain.finetune import FinetuneSettings

    # No storage given: each fit gets a folder of its own, removed after it (2 were left per call).
    made = finetune_folders
    s = FinetuneSettings(max_steps=2, batch_size=32, num_workers=2, use_gpu="false", train_subset=128)
    # the checkpoint as a user names it, relative to the shell's folder (the workers run elsewhere)
    monkeypatch.chdir(tiny_ckpt["run_dir"].parent)
    report = run_eval(tiny_ckpt["run_dir"].name, cifar_small["train"], cifar_small["test"], "finetune",
                      use_gpu="false", progress=False, log=_quiet, finetune=s)
    (r,) = report.results
    keys = {"finetune_top1", "finetune_top5", "finetune_macro_f1"}
    assert set(r.pretrained) == set(r.random_init) == keys == set(r.gain())
    for init in ("pretrained", "random_init"):
        # the same budget for both: 2 steps, every val image scored once over the 2 workers' slices
        assert r.info[init]["step"] == 2 and r.info[init]["val_images"] == 300
    assert r.gain()["finetune_top1"] == pytest.approx(r.pretrained["finetune_top1"] - r.random_init["finetune_top1"])
    assert report.metrics()["eval_gain_finetune_macro_f1"] == r.gain()["finetune_macro_f1"]
    assert len(made) == 2 and not any(p.exists() for p in made)


@pytest.mark.ray
@pytest.mark.slow
def test_eval_finds_and_logs_to_a_real_pretraining_run(tiny_runs, capsys):
    """The shared tiny Ray runs: `sslray eval` on a run folder uses its config's data and its MLflow run."""
    from mlflow.tracking import MlflowClient

    from sslray.cli import main

    run_dir = sorted(p.parent for p in (tiny_runs.root / "runs").glob("*/sslray_run.json"))[0]
    run_id = json.loads((run_dir / "sslray_run.json").read_text())["run_id"]
    assert main(["eval", "--checkpoint", str(run_dir), "--protocol", "knn", "--knn-k", "20", "--gpu", "false"]) == 0
    assert f"logged to MLflow run {run_id}" in capsys.readouterr().out
    metrics = MlflowClient(tracking_uri=tiny_runs.uri).get_run(run_id).data.metrics
    assert {"eval_knn_k20_top1", "eval_random_init_knn_k20_top1", "eval_gain_knn_k20_top1"} <= set(metrics)


def _finetune_rank_main(rank: int, world: int, init_method: str, out: str, c: dict):
    """One gloo rank of ``finetune_loop``, noting the RNG state at each augmentation call and the
    classifier's weights before and after."""
    import hashlib

    import torch
    import torch.distributed as dist

    from sslray.datasets import views
    from sslray.raytrain import finetune

    def digest(t) -> str:
        return hashlib.sha1(t.numpy().tobytes()).hexdigest()[:16]

    states, nets, start = [], [], []
    real_get = views.BACKENDS.get

    def recording_backend(name):
        build = real_get(name)

        def make(params):
            aug = build(params)

            def note(*_):
                states.append(digest(torch.get_rng_state()))
                if not start:
                    start.append(weights())  # before the first step, after rank 0's weights were broadcast

            aug.register_forward_pre_hook(note)
            return aug
        return make

    views.BACKENDS.get = recording_backend
    real_cls = finetune.Classifier
    finetune.Classifier = lambda *a: nets.append(real_cls(*a)) or nets[-1]

    def weights() -> str:
        return digest(torch.cat([p.detach().flatten() for p in nets[0].state_dict().values() if p.is_floating_point()]))

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        last = finetune.finetune_loop(c, finetune.local_session("false", lambda *a, **k: None))
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"views": states, "last": last, "start": start[0], "end": weights()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_finetune_ranks_draw_their_own_views_and_stay_in_step(tiny_ckpt, cifar_small, tmp_path):
    """Two gloo processes fine-tune one checkpoint: each rank augments from its own random stream (one
    shared stream gave image i of every shard the same crop), the gradients keep the weights equal on
    both ranks, and every val image is scored once over the two ranks' slices."""
    from dataclasses import asdict

    import torch.multiprocessing as mp

    from sslray.raytrain.finetune import FinetuneSettings

    s = FinetuneSettings(max_steps=3, batch_size=32, use_gpu="false", train_subset=128)
    c = {"state_path": str(tiny_ckpt["state"]), "train": cifar_small["train"], "val": cifar_small["test"],
         "init": "pretrained", "settings": asdict(s)}
    out = str(tmp_path / "ft")
    mp.spawn(_finetune_rank_main, args=(2, f"file://{tmp_path / 'rdv'}", out, c), nprocs=2, join=True)
    r0, r1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in range(2))
    assert len(r0["views"]) == len(r1["views"]) == 3
    assert not set(r0["views"]) & set(r1["views"]), "rank 1 augmented from rank 0's random stream"
    assert len(set(r0["views"])) == 3, "rank 0's stream did not move between steps"
    assert r0["start"] == r1["start"] != r0["end"] == r1["end"], "the ranks' weights drifted apart"
    assert r0["last"]["step"] == 3 and r0["last"]["val_images"] == 300  # 150 per rank, none twice
    for key in ("train_loss", "top1", "top5", "macro_f1"):
        assert r0["last"][key] == r1["last"][key], key
