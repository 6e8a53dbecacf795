from __future__ import annotations

import pytest

from sslray.config import Config, ConfigError, effective_lr, flatten, load_config, recipe_path


def test_unknown_keys_are_rejected_by_name():
    with pytest.raises(ConfigError, match="optim.bogus"):
        load_config(None, ["optim.bogus=1"])
    with pytest.raises(ConfigError, match="nosection"):
        load_config(None, ["nosection.x=1"])


def test_overrides_are_typed_and_checked():
    cfg = load_config("smoke", ["optim.base_lr=0.3", "train.epochs=7", "model.cifar_stem=true"])
    assert cfg.optim.base_lr == 0.3 and cfg.train.epochs == 7 and cfg.model.cifar_stem is True
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="model.cifar_stem"):
        load_config(None, ["model.cifar_stem=maybe"])


@pytest.mark.parametrize("key", ["data.batch_size", "method.temperature", "train.knn_k", "train.knn_temperature",
                                 "train.knn_every", "train.epochs", "ray.num_workers", "data.decode_res",
                                 "views.crop_size", "ray.num_to_keep", "ray.cpus_per_worker", "monitor.check_every"])
def test_keys_that_only_make_sense_above_zero_refuse_zero_and_below(key):
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match=f"config key '{key}': .*must be above 0, got {bad}"):
            load_config("smoke", [f"{key}={bad}"])
    assert load_config("smoke", [f"{key}=2"]) is not None


@pytest.mark.parametrize("key", ["optim.base_lr", "data.loader_workers", "data.train_subset", "train.seed",
                                 "train.checkpoint_every_steps", "monitor.max_nonfinite_skips", "optim.clip_grad"])
def test_keys_where_zero_means_off_refuse_only_negatives(key):
    """``data.decode_res=0`` used to abort a Ray worker in OpenCV; these take 0 (off, all) but not -1."""
    with pytest.raises(ConfigError, match=f"config key '{key}': .*must be 0 or more, got -1"):
        load_config("smoke", [f"{key}=-1"])
    assert load_config("smoke", [f"{key}=0"]) is not None


@pytest.mark.parametrize("override, match", [
    ("views.min_scale=2", r"'views.min_scale': must be a crop area fraction in \(0, 1\], got 2"),
    ("views.min_scale=0", r"'views.min_scale': must be a crop area fraction"),
    ("optim.momentum=1.5", r"'optim.momentum': must be in \[0, 1\)"),
    ("ray.use_gpu=maybe", r"'ray.use_gpu': expected one of auto, true, false"),
    ("model.compile_mode=fast", r"'model.compile_mode': expected one of default, reduce-overhead"),
    ("ray.placement_strategy=SPRED", r"'ray.placement_strategy': expected one of PACK, SPREAD"),
    ("model.backbone.depth=18", r"'model.backbone': expected text, got a mapping"),
])
def test_values_outside_a_keys_range_or_set_are_refused_by_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("smoke", [override])


def test_wrong_nesting_in_a_recipe_is_refused_not_turned_into_text(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train:\n    path: x.beton\n")
    with pytest.raises(ConfigError, match=r"'data.train': expected text, got a mapping \({'path': 'x.beton'}\)"):
        load_config(str(recipe))


def test_yaml_booleans_and_any_case_are_gpu_choices(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("ray:\n  use_gpu: true\n")
    assert load_config(str(recipe)).ray.use_gpu == "True"
    assert load_config("smoke", ["ray.use_gpu=FALSE"]).ray.use_gpu == "FALSE"


def test_every_recipe_loads():
    import pathlib

    for p in sorted(pathlib.Path(recipe_path("smoke")).parent.glob("*.yaml")):
        assert isinstance(load_config(str(p)), Config), p


def test_effective_lr_rules():
    cfg = load_config(None, ["data.batch_size=512", "optim.base_lr=0.1"])
    assert effective_lr(cfg) == pytest.approx(0.2)
    assert effective_lr(cfg.replace(**{"optim.lr_scaling": "sqrt"})) == pytest.approx(0.1 * 2**0.5)
    assert effective_lr(cfg.replace(**{"optim.lr_scaling": "none"})) == pytest.approx(0.1)


def test_flatten_round_trips_every_key():
    flat = flatten(Config())
    assert flat["optim.base_lr"] == Config().optim.base_lr
    assert "method.params" in flat and "data.train" in flat
