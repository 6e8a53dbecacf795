"""`sslray tune` guards (fast, no Ray cluster): what Tune hears from a trial, the keys a sweep forces on
every trial (also on a study's recipes), the search-space checks that run before anything starts, a
trial the config rejects failing alone, and the number of trials a sweep runs."""

from __future__ import annotations

import pytest

from sslray.config import load_config
from sslray.tune.space import Dist
from sslray.tune.sweep import make_spec

DATA = ["data.train=/d/train.beton", "data.val=/d/val.beton"]


# -------------------------------------------------------------------------------- number of trials


@pytest.mark.parametrize("search,total", [("random", 12), ("grid", 4 * 3 * 3), ("optuna", 4)])
def test_total_trials_is_what_tune_runs(search, total):
    """Optuna samples a grid(...) key as a categorical choice, so it runs num_samples trials."""
    space = {"optim.base_lr": Dist("loguniform", (1e-3, 1.0)), "optim.weight_decay": Dist("grid", (0.0, 1e-5, 1e-4))}
    spec = make_spec(load_config("smoke", DATA), space, name="s", storage="/tmp/s", num_samples=4, search=search)
    assert spec.total_trials() == total
