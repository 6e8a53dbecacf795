"""The config, method-params and CLI references (docs/config.md, docs/params.md, docs/cli.md), made
from the code itself.

Every config key with its type, default and the comment beside it in ``sslray/config.py``, every
method's ``method.params`` (its builder's keyword arguments and docstring) and every command's
``--help``, so no key, param or flag goes undocumented and none of it can drift from the code:
tests/test_docgen.py fails when a file here differs from what ``python -m sslray.docgen`` writes.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
HELP_WIDTH = "100"  # argparse wraps to $COLUMNS: a fixed width makes the file the same everywhere
_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s?(.*)$")


def _comments(cls) -> dict[str, str]:
    """Field name -> the ``# comment`` on its line in the dataclass's source."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = _COMMENT.match(line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _default(f) -> str:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if value == "" or value == {}:
        return '""' if value == "" else "{}"
    return str(value)


def config_reference() -> str:
    from .config import Config

    lines = ["# Config reference", "",
             "Every key of a run's config, as `section.key=value` on any command line (or in a recipe YAML "
             "under `section:`). Recipes (`sslray/configs/*.yaml`) set some of them; these are the values "
             "when nothing does. Unknown keys are refused by name. Made by `python -m sslray.docgen` from "
             "`sslray/config.py`.", ""]
    for section in fields(Config):
        cls = section.type if isinstance(section.type, type) else type(section.default_factory())
        notes = _comments(cls)
        lines += [f"## {section.name}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in fields(cls):
            typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            note = notes.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{section.name}.{f.name}` | {typ} | `{_default(f)}` | {note} |")
        lines.append("")
    return "\n".join(lines)


def params_reference() -> str:
    from .raytrain.methods import METHODS

    lines = ["# Method params reference", "",
             "Each method's `method.params`: the keyword arguments of its builder, set as "
             "`method.params.<key>=value` on any command line or under `method: params:` in a recipe. A key "
             "the method does not take is refused by name; a value is read as the type below. Recipes "
             "(`sslray/configs/*.yaml`) set some of them; these are the values when nothing does. Made by "
             "`python -m sslray.docgen` from the builders in `sslray/raytrain/methods/`.", ""]
    for name in sorted(METHODS.names()):
        builder = METHODS.get(name)
        params = [p for k, p in inspect.signature(builder).parameters.items()
                  if k not in ("cfg", "backbone", "feat_dim")]
        lines += [f"## {name}", "", f"Family: {builder.family}; view preset: `{builder.default_views}`.", ""]
        doc = inspect.getdoc(builder)
        if doc:
            lines += [doc, ""]
        if not params:
            lines += ["No params.", ""]
            continue
        lines += ["| key | type | default |", "|---|---|---|"]
        for p in params:
            typ = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", p.annotation)
            default = str(p.default).lower() if isinstance(p.default, bool) else p.default
            lines.append(f"| `method.params.{p.name}` | {typ} | `{default}` |")
        lines.append("")
    return "\n".join(lines)


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:  # argparse keeps its subparsers here and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def cli_reference() -> str:
    from .cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        parser = build_parser()
        parts = ["# Command reference", "",
                 "`sslray <command> --help` for every command. Made by `python -m sslray.docgen`; the guides "
                 "(README, docs/*.md) say when to use which.", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub in _subcommands(parser):
            parts += [f"## sslray {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


REFERENCES = {"config.md": config_reference, "params.md": params_reference, "cli.md": cli_reference}


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    for name, make in REFERENCES.items():
        text = make()
        path = DOCS / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m sslray.docgen", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
