"""What `sslray methods` prints, read without importing torch or timm (the method registry takes ~4 s to import).

``FAMILIES`` mirrors the ``.family`` of every builder in ``sslray.raytrain.methods.METHODS``;
tests/test_cli_startup.py fails the moment the two differ. The recipes come from the YAML files
themselves, so they cannot drift.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import CONFIG_DIR, MethodConfig, load_yaml

FAMILIES: dict[str, str] = {
    "barlowtwins": "non-contrastive",
    "byol": "non-contrastive",
    "dino": "distillation",
    "ijepa": "MIM",
    "mae": "MIM",
    "mocov2": "contrastive",
    "mocov3": "contrastive",
    "nnclr": "contrastive",
    "simclr": "contrastive",
    "simsiam": "non-contrastive",
    "swav": "clustering",
    "vicreg": "non-contrastive",
    "vicregl": "non-contrastive",
}

# The methods that take local crops (views.local_crops), mirroring the builders' ``.multicrop``.
MULTICROP = frozenset({"barlowtwins", "byol", "dino", "simclr", "swav", "vicreg"})


def _crops(multicrop: bool) -> str:
    return "multi-crop" if multicrop else "-"


def recipes_by_method() -> dict[str, list[str]]:
    """Built-in recipe names (sslray/configs/*.yaml) per ``method.name`` they train, sorted."""
    out: dict[str, list[str]] = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        method = (load_yaml(path).get("method") or {}).get("name", MethodConfig().name)
        out.setdefault(str(method).lower(), []).append(path.stem)
    return out


def method_lines(plugins: Sequence[str] = ()) -> list[str]:
    """One line per method: name, family, whether it takes local crops, and the recipes that train
    it. Given ``method.plugins``
    modules, their methods follow, with the module in place of recipes: listing them means importing
    the registry (torch, timm), which the built-in table alone never does."""
    recipes = recipes_by_method()
    lines = [f"{name:14s} {family:16s} {_crops(name in MULTICROP):11s} {', '.join(recipes.get(name, [])) or '-'}"
             for name, family in sorted(FAMILIES.items())]
    if plugins:
        from .raytrain.methods import METHODS, import_plugins

        import_plugins(plugins)
        for name in METHODS.names():
            if name not in FAMILIES:
                builder = METHODS.get(name)
                family = getattr(builder, "family", "-")
                lines.append(f"{name:14s} {family:16s} {_crops(getattr(builder, 'multicrop', False)):11s} "
                             f"plugin {getattr(builder, '__module__', '?')}")
    return lines
