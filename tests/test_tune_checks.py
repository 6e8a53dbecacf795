"""`sslray tune` guards (fast, no Ray cluster): what Tune hears from a trial, the keys a sweep forces on
every trial (also on a study's recipes), the search-space checks that run before anything starts, a
trial the config rejects failing alone, and the number of trials a sweep runs."""

from __future__ import annotations

import pytest

from sslray.config import ConfigError, load_config
from sslray.tune.space import Dist, check_space, default_space, parse_space
from sslray.tune.sweep import make_spec

DATA = ["data.train=/d/train.beton", "data.val=/d/val.beton"]


# ------------------------------------------------------------------ search space, before anything runs


@pytest.mark.parametrize("recipe,text,match", [
    ("smoke", "batch_size=randint(64,257)", r"data.batch_size=choice\(\.\.\.\)"),
    ("smoke", "batch_size=uniform(64,512)", r"data.batch_size=choice\(\.\.\.\)"),
    ("smoke", "batch_size=loguniform(64,1024)", r"data.batch_size=choice\(\.\.\.\)"),
    ("smoke", "train.epochs=uniform(1,5)", r"train.epochs=randint\(1, 6\)"),
    ("smoke", "views.local_crops=loguniform(1,8)", r"views.local_crops is an integer"),
    ("mocov2_cifar10", "method.params.queue_size=uniform(1024,4096)", r"method.params.queue_size=randint"),
    ("mae_cifar10", "mask_ratio=uniform(0.5,1.5)", r"method.params.mask_ratio must be in \[0, 1\)"),
    ("mae_cifar10", "mask_ratio=choice(0.75,1.0)", r"method.params.mask_ratio must be in \[0, 1\)"),
    ("mae_cifar10", "method.params.mask_raito=uniform(0.5,0.9)", r"takes no method.params.mask_raito.*mask_ratio"),
    ("simclr_cifar10", "temperature=uniform(0,0.5)", r"method.temperature must be positive"),
    ("dino_cifar10", "method.params.teacher_temp=choice(0.0,0.04)", r"method.params.teacher_temp must be positive"),
])
def test_space_values_a_trial_would_refuse_are_refused_by_name(recipe, text, match):
    cfg = load_config(recipe, DATA)
    with pytest.raises(ConfigError, match=match):
        check_space(parse_space([text]), cfg)


@pytest.mark.parametrize("recipe,text", [
    ("smoke", "batch_size=choice(64,128)"),
    ("smoke", "batch_size=grid(64,128)"),
    ("smoke", "train.epochs=randint(1,5)"),
    ("smoke", "optim.weight_decay=loguniform(1e-6,1e-3)"),
    ("mae_cifar10", "mask_ratio=uniform(0.5,0.9)"),
    ("mocov2_cifar10", "method.params.queue_size=choice(1024,4096)"),
    ("dino_cifar10", "method.params.warmup_teacher_temp_epochs=choice(0,10)"),
])
def test_space_values_every_trial_takes_pass(recipe, text):
    check_space(parse_space([text]), load_config(recipe, DATA))


def test_default_space_names_the_batch_size_when_none_divides_over_the_workers():
    cfg = load_config("simclr_cifar10", [*DATA, "data.batch_size=512", "ray.num_workers=3"])
    with pytest.raises(ConfigError, match=r"data.batch_size: none of 256, 512, 1024 .* 3 workers"):
        default_space(cfg)


# -------------------------------------------------------------------------------- number of trials


@pytest.mark.parametrize("search,total", [("random", 12), ("grid", 4 * 3 * 3), ("optuna", 4)])
def test_total_trials_is_what_tune_runs(search, total):
    """Optuna samples a grid(...) key as a categorical choice, so it runs num_samples trials."""
    space = {"optim.base_lr": Dist("loguniform", (1e-3, 1.0)), "optim.weight_decay": Dist("grid", (0.0, 1e-5, 1e-4))}
    spec = make_spec(load_config("smoke", DATA), space, name="s", storage="/tmp/s", num_samples=4, search=search)
    assert spec.total_trials() == total
