"""Command-line flags and ``key=value`` overrides keep the user's text: a run name, experiment or path
is never re-read as YAML (octal, sexagesimal, booleans, ``#`` comments)."""

from __future__ import annotations

import pytest

from sslray.cli import build_parser, config_from_args
from sslray.config import ConfigError, load_config
from sslray.tune.cli import base_config

ODD_TEXT = ["0755", "12:30", "1_000", "off", "null", "0x1F", "2024-01-02"]  # each a non-string in YAML 1.1
ODD_PATH = "/data/set #2/train.beton"  # " #" starts a YAML comment


def pretrain_config(*argv: str):
    return config_from_args(build_parser().parse_args(["pretrain", *argv]))


@pytest.mark.parametrize("text", ODD_TEXT)
def test_flag_text_is_kept_as_written(text):
    cfg = pretrain_config("--name", text, "--experiment", text, "--views", "default")
    assert cfg.ray.name == text and cfg.tracking.experiment == text


def test_flag_path_is_kept_whole():
    cfg = pretrain_config("--data", ODD_PATH, "--val", ODD_PATH, "--storage", "/runs #1")
    assert cfg.data.train == cfg.data.val == ODD_PATH and cfg.ray.storage == "/runs #1"


@pytest.mark.parametrize("text", ODD_TEXT)
def test_override_of_a_text_key_is_kept_as_written(text):
    cfg = load_config(None, [f"ray.name={text}", f"tracking.experiment={text}", f"data.train={ODD_PATH}"])
    assert cfg.ray.name == text and cfg.tracking.experiment == text and cfg.data.train == ODD_PATH


def test_other_overrides_are_still_typed_and_checked():
    cfg = load_config(None, ["train.epochs=7", "optim.base_lr=0.3", "views.blur=true", "method.params={a: 1}"])
    assert cfg.train.epochs == 7 and cfg.optim.base_lr == 0.3 and cfg.views.blur is True
    assert cfg.method.params == {"a": 1}
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=0755x"])
    with pytest.raises(ConfigError, match="optim.base_lr"):
        load_config(None, ["optim.base_lr=[1"])  # unreadable YAML names the override


def test_field_type_walks_the_config_tree():
    from sslray.config import field_type

    assert field_type("ray.name") is str and field_type("data.batch_size") is int
    assert field_type("views.blur") is bool and field_type("optim.base_lr") is float
    assert field_type("method.params.mask_ratio") is None and field_type("nope.key") is None


def test_overrides_win_over_flags_and_typed_flags_still_apply():
    cfg = pretrain_config("--epochs", "3", "--max-failures", "2", "--auto-batch", "--checkpoint-every", "500steps",
                          "train.epochs=5")
    assert cfg.train.epochs == 5 and cfg.ray.max_failures == 2 and cfg.data.auto_batch is True
    assert cfg.train.checkpoint_every_steps == 500


def test_tune_flags_keep_their_text():
    a = build_parser().parse_args(["tune", "--name", "s", "--method", "simclr", "--data", ODD_PATH, "--val", ODD_PATH,
                                   "ray.name=0755"])
    cfg = base_config(a)
    assert cfg.data.train == cfg.data.val == ODD_PATH and cfg.ray.name == "0755"
