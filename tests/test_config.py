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
                                 "train.knn_every"])
def test_keys_that_only_make_sense_above_zero_refuse_zero_and_below(key):
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match=f"config key '{key}': .*must be above 0, got {bad}"):
            load_config("smoke", [f"{key}={bad}"])
    assert load_config("smoke", [f"{key}=2"]) is not None


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
