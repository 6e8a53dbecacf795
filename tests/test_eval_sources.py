"""Eval protocols and `sslray embed` on backbones that are no sslray checkpoint: an `sslray export`
folder and timm:<name> with another tool's state_dict (--weights) score exactly what the checkpoint
they came from scores; cache keys, MLflow lookups and errors tell the sources apart."""

from __future__ import annotations

import json
from pathlib import Path
import shutil

import numpy as np
import pytest

from conftest import tiny_checkpoint
from sslray.eval import features as F
from sslray.eval import run_eval
from sslray.eval.source import SourceOptions, resolve_source, source_kind

SUBSETS = {"train_subset": 300, "val_subset": 100}


def _quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def sources(cifar_small, tmp_path_factory, one_thread) -> dict:
    """The tiny checkpoint, its export (inside the run folder, as `sslray pretrain` writes it) and its
    backbone saved as another tool would: a .pt wrapping a state_dict that also holds a classifier."""
    import torch
    from safetensors.torch import load_file

    from sslray.export import WEIGHTS, export_backbone

    root = tmp_path_factory.mktemp("eval_sources")
    ck = tiny_checkpoint(cifar_small, root, "eval-sources")
    export = export_backbone(ck["state"], ck["run_dir"] / "backbone")
    sd = load_file(str(export / WEIGHTS))
    other = root / "other_tool" / "resnet18_ssl.pth"
    other.parent.mkdir()
    torch.save({"epoch": 3, "state_dict": {**sd, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}},
               other)
    return {**ck, "export": export, "other": other}


def _store(checkpoint, cifar_small, opts=None, **kw):
    src = resolve_source(str(checkpoint), opts, data=(cifar_small["train"], cifar_small["test"]))
    return F.FeatureStore(src, cifar_small["train"], cifar_small["test"], use_gpu="false", cache=False,
                          progress=False, log=_quiet, **{**SUBSETS, **kw})


def _eval(checkpoint, cifar_small, protocols="linear,knn", **kw):
    return run_eval(str(checkpoint), cifar_small["train"], cifar_small["test"], protocols, use_gpu="false",
                    cache=False, progress=False, log=_quiet, baseline=False, knn_ks=(5, 20), **SUBSETS, **kw)


def test_the_kinds_are_told_apart_from_the_spelling_and_files(sources, tmp_path):
    assert source_kind(sources["state"]) == source_kind(sources["run_dir"]) == "checkpoint"
    assert source_kind(sources["export"]) == source_kind(sources["export"] / "backbone.json") == "export"
    assert source_kind(sources["export"] / "backbone.safetensors") == "export"
    assert source_kind("timm:resnet18") == "timm"
    assert source_kind(tmp_path / "nowhere") == "checkpoint"  # find_state names it as missing


def test_an_export_scores_exactly_what_its_checkpoint_scores(sources, cifar_small):
    """The strong invariant: the exported backbone, rebuilt from backbone.json and fed by its input size,
    mean and std, gives the checkpoint's features bit for bit, hence its linear and kNN numbers."""
    ck, ex = _store(sources["state"], cifar_small), _store(sources["export"], cifar_small)
    assert ex.source.kind == "export" and ex.state_path is None
    assert (ex.cfg.views.crop_size, ex.cfg.data.decode_res) == (ck.cfg.views.crop_size, ck.cfg.data.decode_res)
    np.testing.assert_array_equal(ex.get("pretrained").val_x, ck.get("pretrained").val_x)
    np.testing.assert_array_equal(ex.get("pretrained").train_x, ck.get("pretrained").train_x)
    a, b = _eval(sources["state"], cifar_small, store=ck), _eval(sources["export"], cifar_small, store=ex)
    assert [r.name for r in b.results] == ["linear", "knn"]
    for ra, rb in zip(a.results, b.results):
        assert rb.pretrained == ra.pretrained and ra.pretrained
    assert b.checkpoint == str(sources["export"] / "backbone.safetensors")


def test_an_exports_random_init_baseline_and_subsets_are_its_runs(cifar_small, tmp_path, one_thread):
    """backbone.json records the run's train.seed: an export's random-init baseline (and its subsets) were
    seeded with 0 whatever the run's seed, so only its pretrained numbers were the checkpoint's."""
    import json

    from sslray.export import META, export_backbone

    ck = tiny_checkpoint(cifar_small, tmp_path, "eval-sources-seed", ["train.seed=7"])
    export = export_backbone(ck["state"], tmp_path / "exported")
    assert json.loads((export / META).read_text())["seed"] == 7
    a, b = _store(ck["state"], cifar_small), _store(export, cifar_small)
    assert b.cfg.train.seed == a.cfg.train.seed == 7
    for split in ("train_x", "val_x"):
        np.testing.assert_array_equal(getattr(b.get("random_init"), split), getattr(a.get("random_init"), split))
    old = json.loads((export / META).read_text())
    del old["seed"]  # an export written before the seed was recorded reads as seed 0
    (export / META).write_text(json.dumps(old))
    assert _store(export, cifar_small).cfg.train.seed == 0


def test_timm_with_another_tools_state_dict_scores_what_the_export_scores(sources, cifar_small):
    opts = SourceOptions(weights=str(sources["other"]))
    tm, ex = _store("timm:resnet18", cifar_small, opts), _store(sources["export"], cifar_small)
    # the data's 32 px and ImageNet's statistics unless told: the checkpoint's views say CIFAR's
    assert tm.cfg.views.crop_size == 32 and tm.cfg.views.mean != ex.cfg.views.mean
    mean, std = ex.cfg.views.mean, ex.cfg.views.std
    opts = SourceOptions(weights=str(sources["other"]), mean=mean, std=std)
    tm = _store("timm:resnet18", cifar_small, opts)
    np.testing.assert_array_equal(tm.get("pretrained").val_x, ex.get("pretrained").val_x)
    a = _eval(sources["export"], cifar_small, store=ex)
    b = _eval("timm:resnet18", cifar_small, store=tm)  # the store's features, scored by run_eval's protocols
    assert [r.pretrained for r in b.results] == [r.pretrained for r in a.results]
    assert b.checkpoint.startswith("timm:resnet18 with the weights of")
    c = _eval("timm:resnet18", cifar_small, source=opts)  # run_eval resolving the source itself
    assert [r.pretrained for r in c.results] == [r.pretrained for r in a.results]


def test_a_timm_model_without_weights_is_its_seeded_random_init(cifar_small):
    a, b = (_store("timm:resnet18", cifar_small, train_subset=20, val_subset=20) for _ in range(2))
    np.testing.assert_array_equal(a.get("pretrained").val_x, b.get("pretrained").val_x)
    assert not np.allclose(a.get("pretrained").val_x, a.get("random_init").val_x, atol=1e-3)


def test_an_export_in_object_storage_scores_what_the_local_one_does(sources, cifar_small, s3_server):
    """`sslray export` (and pretrain with s3:// storage) writes exports to object storage: eval and
    embed take its URI as an export (not a checkpoint without a state.pt)."""
    from sslray.export import export_to

    uri = s3_server.bucket("exports") + "/c10"
    export_to(sources["run_dir"], uri)
    assert source_kind(uri) == "export" and source_kind(uri + "/backbone.json") == "export"
    assert source_kind(s3_server.bucket("runs") + "/r1") == "checkpoint"
    local, remote = (_store(x, cifar_small) for x in (sources["export"], uri))
    np.testing.assert_array_equal(remote.get("pretrained").val_x, local.get("pretrained").val_x)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_a_fixed_size_timm_model_is_built_at_the_datas_resolution(name, cifar_small):
    """Not only names with "vit" in them take timm's img_size: a DeiT or Swin given the 32-px CIFAR
    split is built for 32 px (at its default 224 the first batch failed)."""
    store = _store(f"timm:{name}", cifar_small, train_subset=8, val_subset=8)
    assert store.cfg.views.crop_size == 32 and store.get("pretrained").val_x.shape[0] == 8


def test_cache_keys_differ_between_sources_and_live_beside_each(sources, cifar_small, tmp_path, monkeypatch):
    monkeypatch.setenv("SSLRAY_CACHE_DIR", str(tmp_path / "cache"))
    with_weights = SourceOptions(weights=str(sources["other"]))
    stores = {"checkpoint": _store(sources["state"], cifar_small), "export": _store(sources["export"], cifar_small),
              "timm+weights": _store("timm:resnet18", cifar_small, with_weights),
              "timm": _store("timm:resnet18", cifar_small), "timm34": _store("timm:resnet34", cifar_small)}
    keys = {k: s.key("pretrained")[0] for k, s in stores.items()}
    assert len(set(keys.values())) == len(keys), keys
    assert _store(sources["export"], cifar_small).key("pretrained")[0] == keys["export"]  # stable
    # an export given by folder or by file is the same weights: one cache entry
    assert _store(sources["export"] / "backbone.safetensors", cifar_small).key("pretrained")[0] == keys["export"]
    for s in stores.values():
        s.cache_dir = F.FeatureStore(s.source, s.train, s.val, use_gpu="false", log=_quiet).cache_dir
    assert stores["export"].cache_dir == sources["export"] / "features"
    assert stores["timm+weights"].cache_dir == sources["other"].parent / "features"
    assert stores["timm"].cache_dir == tmp_path / "cache" / "timm" / "features"


def test_embed_writes_eval_features_labels_and_file_names(sources, cifar_small, tmp_path):
    from sslray.eval.embed import embed_data

    beton = tmp_path / "val.beton"
    shutil.copy(cifar_small["test"], beton)
    shutil.copy(cifar_small["test"].replace(".beton", ".manifest.json"), tmp_path / "val.manifest.json")
    arrays = embed_data(str(sources["export"]), str(beton), use_gpu="false", progress=False, log=_quiet)
    assert "paths" not in arrays  # no sidecar, no names
    store = F.FeatureStore(str(sources["export"]), cifar_small["train"], cifar_small["test"], use_gpu="false",
                           cache=False, progress=False, log=_quiet)
    f = store.get("pretrained")  # the whole val split, as eval extracts it
    assert arrays["embeddings"].dtype == np.float32 and arrays["embeddings"].shape == (300, 512)
    np.testing.assert_array_equal(arrays["embeddings"], f.val_x)
    np.testing.assert_array_equal(arrays["labels"], f.val_y)
    assert list(arrays["classes"]) == f.classes
    meta = json.loads(str(arrays["meta"]))
    assert meta["kind"] == "export" and meta["crop_size"] == 32 and meta["dim"] == 512
    import sslray

    again = sslray.embed(sources["export"], beton, use_gpu="false", progress=False)  # the Python API
    np.testing.assert_array_equal(again["embeddings"], arrays["embeddings"])

    # the list `sslray convert` writes beside a .beton: each row's source file, found under the source tree
    from sslray.datasets.convert import paths_path

    shutil.copy(paths_path(cifar_small["test"]), paths_path(beton))
    arrays = embed_data(str(sources["export"]), str(beton), use_gpu="false", progress=False, log=_quiet)
    paths = [Path(p) for p in arrays["paths"]]
    assert len(paths) == 300 and all(p.is_file() for p in paths)
    assert [p.parent.name for p in paths] == [arrays["classes"][y] for y in arrays["labels"]]  # row order
    paths_path(beton).write_text("".join(f"{p.name}\n" for p in paths[:-1]))
    with pytest.raises(F.DataError, match=r"val.paths.txt lists 299 paths but .*val.manifest.json counts 300"):
        embed_data(str(sources["export"]), str(beton), use_gpu="false", progress=False, log=_quiet)


def test_embed_an_image_folder_names_its_files_in_loader_order(sources, cifar_small):
    from sslray.eval.embed import embed_data

    tree = cifar_small["test_tree"]
    arrays = embed_data(str(sources["state"]), str(tree), batch_size=64, use_gpu="false", progress=False,
                        log=_quiet)
    classes = sorted(p.name for p in tree.iterdir())
    want = [str(f) for c in classes for f in sorted((tree / c).iterdir())]
    assert list(arrays["paths"]) == want and arrays["embeddings"].shape == (300, 512)
    assert [classes[i] for i in arrays["labels"]] == [p.split("/")[-2] for p in want]


def test_embed_head_is_the_projector_output_of_a_checkpoint_only(sources, cifar_small):
    from sslray.eval.embed import embed_data

    kw = {"use_gpu": "false", "progress": False, "log": _quiet}
    arrays = embed_data(str(sources["state"]), cifar_small["test"], head=True, **kw)
    assert arrays["embeddings"].shape == (300, 32)  # the smoke recipe's model.proj_out_dim
    with pytest.raises(ValueError, match="--head: .* export source, a backbone without the method's projector"):
        embed_data(str(sources["export"]), cifar_small["test"], head=True, **kw)


def test_cli_embed_writes_once_and_refuses_to_overwrite(sources, cifar_small, tmp_path, capsys):
    from sslray.cli import main

    out = tmp_path / "emb.npz"
    args = ["embed", "--checkpoint", "timm:resnet18", "--weights", str(sources["other"]), "--data",
            cifar_small["test"], "--out", str(out), "--gpu", "false"]
    assert main(args) == 0
    assert "300 x 512 embeddings" in capsys.readouterr().out
    with np.load(out) as z:
        assert z["embeddings"].shape == (300, 512) and len(z["labels"]) == 300
    assert main(args) == 2
    assert f"--out {out} already exists; pass --force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "timm:resnet18", "--weights", "{tmp}/missing.pth"], "--weights {tmp}/missing.pth not found"),
    (["--checkpoint", "timm:resnet1800"], "unknown timm model 'resnet1800'"),
    (["--checkpoint", "timm:resnet34", "--weights", "{other}"], "--weights {other} does not fit backbone ResNet"),
    (["--checkpoint", "{state}", "--weights", "{other}"], "--weights goes with --checkpoint timm:<model name>"),
    (["--checkpoint", "{other}"], "To evaluate another tool's weights: --checkpoint timm:<model name> --weights"),
    (["--checkpoint", "{export}", "--mean", "0.5,0.5,0.5"], "--mean and --std go together"),
])
def test_bad_sources_are_named_before_any_feature_is_extracted(argv, message, sources, cifar_small, tmp_path,
                                                              capsys, monkeypatch):
    from sslray.cli import main

    monkeypatch.setattr(F, "extract_features", lambda *a, **k: pytest.fail("features were extracted"))
    fill = {"tmp": tmp_path, "other": sources["other"], "state": sources["state"], "export": sources["export"]}
    argv = [a.format(**fill) for a in argv]
    for cmd in (["eval", "--protocol", "knn", "--no-log", "--train", cifar_small["train"]],
                ["embed", "--out", str(tmp_path / "e.npz")]):
        assert main([*cmd, "--val" if cmd[0] == "eval" else "--data", cifar_small["test"], *argv]) == 2
        assert message.format(**fill) in capsys.readouterr().err


def test_finetune_is_refused_for_a_backbone_without_a_checkpoint(sources, cifar_small, monkeypatch):
    monkeypatch.setattr(F, "FeatureStore", lambda *a, **k: pytest.fail("the source was opened first"))
    from sslray.eval import runner

    monkeypatch.setattr(runner, "FeatureStore", lambda *a, **k: pytest.fail("the source was opened first"))
    for src, kind in ((sources["export"], "an exported backbone"), ("timm:resnet18", "a timm model")):
        for protocols, named in (("knn,finetune", "finetune"), ("linear_sgd,knn", "linear_sgd"),
                                 ("finetune,linear_sgd", "finetune,linear_sgd")):
            with pytest.raises(ValueError, match=rf"--protocol {named}: .* is {kind}, not an sslray checkpoint: "
                                                 r"these protocols rebuild the method"):
                run_eval(str(src), cifar_small["train"], cifar_small["test"], protocols, log=_quiet)
    with pytest.raises(ValueError, match="--train and --val are needed for timm:resnet18"):
        run_eval("timm:resnet18", None, None, "knn", log=_quiet)


def test_cli_eval_of_an_export_logs_only_with_a_run_id(sources, cifar_small, capsys):
    """The export sits in the run folder beside sslray_run.json: that run's metrics are its checkpoint's,
    so an export is never logged there unless --run-id says so."""
    from mlflow.tracking import MlflowClient

    from sslray.cli import main

    base = ["eval", "--checkpoint", str(sources["export"]), "--protocol", "knn", "--knn-k", "5", "--train",
            cifar_small["train"], "--val", cifar_small["test"], "--train-subset", "300", "--val-subset", "100",
            "--gpu", "false", "--no-cache", "--no-baseline"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "is no sslray checkpoint, so no pretraining run is looked up; pass --run-id" in out
    assert "knn_k5_top1" in out
    client = MlflowClient(sources["uri"])
    assert "eval_knn_k5_top1" not in client.get_run(sources["run_id"]).data.metrics
    assert main([*base, "--run-id", sources["run_id"], "--tracking-uri", sources["uri"]]) == 0
    assert "eval_knn_k5_top1" in client.get_run(sources["run_id"]).data.metrics


def test_probe_points_a_backbone_without_a_checkpoint_to_eval(sources, cifar_small):
    from sslray.raytrain.evaluate import probe_checkpoint

    for src in (sources["export"], "timm:resnet18"):
        with pytest.raises(ValueError, match=r"sslray probe takes an sslray checkpoint .* `sslray eval --checkpoint"):
            probe_checkpoint(str(src), cifar_small["train"], cifar_small["test"], use_gpu="false", log=_quiet)


def test_splits_converted_two_ways_are_noted_when_the_store_opens(sources, cifar_small, tmp_path):
    """A val split stored with `convert --square pad` beside a cropped train split: the probes would
    compare two kinds of image, and the eval log says so before any feature is extracted."""
    from sslray.datasets.convert import manifest_path

    val = tmp_path / "val.beton"
    shutil.copy(cifar_small["test"], val)
    manifest = json.loads(manifest_path(cifar_small["test"]).read_text())
    manifest["write_params"]["square"] = "pad"
    manifest_path(val).write_text(json.dumps(manifest))
    said: list[str] = []
    F.FeatureStore(str(sources["export"]), cifar_small["train"], str(val), use_gpu="false", cache=False,
                   progress=False, log=said.append)
    assert any("eval: note:" in s and "--square crop" in s and "--square pad" in s for s in said), said
    said.clear()
    F.FeatureStore(str(sources["export"]), cifar_small["train"], cifar_small["test"], use_gpu="false", cache=False,
                   progress=False, log=said.append)
    assert not any("--square" in s for s in said)


def test_crop_size_is_refused_where_a_vit_takes_one_size(tmp_path):
    """A ViT checkpoint or export is built for its training crop (its position embedding): another
    --crop-size is named before any feature is extracted (it failed at the first batch)."""
    import torch

    from sslray.config import load_config
    from sslray.export import rebuild_meta, write_export
    from sslray.raytrain.methods import create_method

    cfg = load_config("mae_cifar10", {"model.backbone": "vit_tiny_patch16_224", "views.crop_size": 32})
    model = create_method(cfg)
    torch.save({"config": cfg.to_dict(), "model": model.state_dict()}, tmp_path / "state.pt")
    write_export(tmp_path / "exp", model.backbone, rebuild_meta(model.backbone, cfg))
    for src in (tmp_path / "state.pt", tmp_path / "exp"):
        with pytest.raises(ValueError, match=r"--crop-size 64: the backbone of .* takes 32-px inputs"):
            resolve_source(str(src), SourceOptions(crop_size=64))
        assert resolve_source(str(src), SourceOptions(crop_size=32)).cfg.views.crop_size == 32


def test_source_options_beside_a_store_are_refused(sources, cifar_small):
    store = _store(sources["export"], cifar_small)
    with pytest.raises(ValueError, match="give source= .* to the FeatureStore"):
        run_eval(str(sources["export"]), cifar_small["train"], cifar_small["test"], "knn", store=store,
                 source=SourceOptions(crop_size=32), log=_quiet)
