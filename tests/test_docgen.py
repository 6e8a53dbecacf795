"""docs/config.md, docs/params.md and docs/cli.md are what `python -m sslray.docgen` makes from the code: a key or flag
added, renamed or re-described without regenerating them fails here."""

from __future__ import annotations

import sys

import pytest

from sslray import docgen


def test_the_config_reference_lists_every_key_with_its_default_and_meaning():
    from sslray.config import Config, flatten

    text = docgen.config_reference()
    keys = [k for k in flatten(Config()) if not k.startswith("method.params")]
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert missing == [], missing
    undescribed = [line for line in text.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert undescribed == [], "config fields without a comment in sslray/config.py: " + "; ".join(undescribed)
    assert "| `data.batch_size` | int | `256` | global batch" in text


def test_the_params_reference_lists_every_methods_params_with_its_default():
    import inspect

    from sslray.raytrain.methods import METHODS

    text = docgen.params_reference()
    for name in METHODS.names():
        assert f"## {name}\n" in text, name
        for k, p in inspect.signature(METHODS.get(name)).parameters.items():
            if k not in ("cfg", "backbone", "feat_dim"):
                default = str(p.default).lower() if isinstance(p.default, bool) else p.default
                assert f"| `method.params.{k}` | " in text and f"| `{default}` |" in text, (name, k)
    assert "| `method.params.mask_ratio` | float | `0.75` |" in text


def test_the_cli_reference_shows_every_command_and_flag():
    from sslray.cli import build_parser

    text = docgen.cli_reference()
    for name, sub in docgen._subcommands(build_parser()):
        assert f"## sslray {name}" in text, name
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, (name, flag)


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="argparse's help layout differs between Python versions")
def test_the_references_in_docs_are_current():
    for name, make in docgen.REFERENCES.items():
        assert (docgen.DOCS / name).read_text() == make(), f"docs/{name} is stale: run python -m sslray.docgen"


def test_the_tune_guide_lists_every_metric_a_sweep_accepts():
    """docs/tune.md's metric table is what `--metric` is checked against (the loop's EPOCH_METRICS)."""
    from sslray.raytrain.loop import EPOCH_METRICS

    text = (docgen.DOCS / "tune.md").read_text()
    assert sorted(m for m in EPOCH_METRICS if f"`{m}`" not in text) == []
