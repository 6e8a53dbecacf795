"""Search spaces: parsed from ``key=dist(...)`` strings or YAML, defaulted per method, turned into Tune domains.

Pure and testable without Ray (Ray is imported only in ``to_param_space``). Keys are config keys
(``optim.base_lr``) or the short aliases below. Trials always sample ``optim.base_lr``, the lr per
256 images: the effective lr of a trial is ``base_lr`` scaled by its sampled ``data.batch_size``
through ``optim.lr_scaling`` (linear | sqrt | none, see ``sslray.config.effective_lr``), so trials
with different batch sizes are compared at the lr the method's rule says is equivalent.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import Config, ConfigError, field_type, load_config, load_yaml

# Short names users type; the space itself always holds full config keys.
ALIASES = {
    "lr": "optim.base_lr",
    "base_lr": "optim.base_lr",
    "weight_decay": "optim.weight_decay",
    "wd": "optim.weight_decay",
    "temperature": "method.temperature",
    "batch_size": "data.batch_size",
    "mask_ratio": "method.params.mask_ratio",
}

# Methods whose loss reads ``method.temperature`` (the others ignore it), with a range around
# the paper values (SimCLR 0.5 on CIFAR, MoCo v2 0.2, MoCo v3 0.2, NNCLR 0.1, DINO/SwAV student 0.1).
TEMPERATURE_RANGES = {
    "simclr": (0.1, 1.0),
    "mocov2": (0.05, 0.5),
    "mocov3": (0.05, 0.5),
    "nnclr": (0.05, 0.5),
    "dino": (0.05, 0.2),
    "swav": (0.05, 0.2),
}
MASK_RATIO_METHODS = {"mae": (0.5, 0.9)}

KINDS = ("uniform", "loguniform", "choice", "randint", "grid")


@dataclass(frozen=True)
class Dist:
    """One searched key: ``kind`` in KINDS with its arguments (bounds, or the values to choose from)."""

    kind: str
    args: tuple

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"unknown distribution {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.kind in ("uniform", "loguniform", "randint"):
            if len(self.args) != 2 or not all(isinstance(a, (int, float)) for a in self.args):
                raise ConfigError(f"{self.kind} takes two numbers (low, high), got {self.args!r}")
            low, high = self.args
            if not low < high:
                raise ConfigError(f"{self.kind}({low}, {high}): low must be below high")
            if self.kind == "loguniform" and low <= 0:
                raise ConfigError(f"loguniform({low}, {high}): bounds must be positive")
        elif not self.args:
            raise ConfigError(f"{self.kind}() needs at least one value")

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(repr(a) for a in self.args)})"

    @property
    def is_log(self) -> bool:
        return self.kind == "loguniform"

    def grid_points(self, n: int = 3) -> list:
        """Values for grid search: the listed values, or ``n`` points spanning the bounds."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args
        if self.kind == "loguniform":
            pts = np.geomspace(low, high, n)
        else:
            pts = np.linspace(low, high, n)
        if self.kind == "randint":  # Tune's randint excludes ``high``
            return sorted({round(p) for p in np.linspace(low, high - 1, n)})
        return [float(f"{p:.6g}") for p in pts]

    def reachable(self, grid: bool = False, grid_points: int = 3) -> list:
        """The values a search can give, or for a sampled range its extremes: a grid's points; for
        random search the low bound and the largest float below ``high`` (Tune's uniform and
        loguniform sample ``[low, high)``, its randint excludes ``high``)."""
        if grid or self.kind in ("choice", "grid", "randint"):
            return self.grid_points(grid_points)
        low, high = self.args
        return [float(low), float(np.nextafter(high, low))]

    def to_tune(self, grid: bool = False, grid_points: int = 3):
        from ray import tune

        if grid or self.kind == "grid":
            return tune.grid_search(self.grid_points(grid_points))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](*self.args)


_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.DOTALL)


_WORD = re.compile(r"^[A-Za-z_][\w.\-/]*$")


def _bare_words(body: str) -> Optional[tuple]:
    """``grid(default,lorot,dcl)``: unquoted names as strings (numbers stay numbers), as a shell user
    writes them; None when an item is neither a literal nor a plain name."""
    out = []
    for item in (part.strip() for part in body.split(",")):
        try:
            out.append(ast.literal_eval(item))
        except (ValueError, SyntaxError):
            if not _WORD.match(item):
                return None
            out.append(item)
    return tuple(out)


def looks_like_dist(text: str) -> bool:
    """``uniform(0.1,0.5)``, ``grid(a,b)``: a call of one of the KINDS (what ``parse_dist`` parses)."""
    m = _CALL.match(text)
    return bool(m) and m.group(1).lower() in KINDS


def parse_dist(value: Any, key: str = "") -> Dist:
    """``"loguniform(1e-4, 1e-1)"``, ``"choice(64, 128)"``, a YAML list (= choice), or a mapping
    ``{dist: uniform, low: 0.1, high: 0.5}`` / ``{dist: choice, values: [...]}`` -> Dist. Errors name ``key``."""
    try:
        return _parse_dist(value, f" for {key!r}" if key else "")
    except ConfigError as e:
        if key and repr(key) not in str(e):
            raise ConfigError(f"--space {key}: {e}") from None
        raise


def _parse_dist(value: Any, where: str) -> Dist:
    if isinstance(value, Dist):
        return value
    if isinstance(value, (list, tuple)):
        return Dist("choice", tuple(value))
    if isinstance(value, Mapping):
        kind = value.get("dist")
        if kind in ("choice", "grid"):
            return Dist(kind, tuple(value.get("values", ())))
        if "low" not in value or "high" not in value:
            raise ConfigError(f"space entry{where} needs dist and low/high (or values), got {dict(value)!r}")
        return Dist(str(kind), (value["low"], value["high"]))
    if isinstance(value, str):
        m = _CALL.match(value)
        if not m:
            raise ConfigError(f"cannot parse {value!r}{where}: write e.g. loguniform(1e-4,1e-1) or choice(64,128)")
        kind, body = m.group(1).lower(), m.group(2)
        try:
            args = ast.literal_eval(f"({body},)") if body.strip() else ()
        except (ValueError, SyntaxError):
            args = _bare_words(body) if kind in ("choice", "grid") else None
            if args is None:
                raise ConfigError(f"cannot parse the arguments of {value!r}{where}: "
                                  "use plain numbers or strings") from None
        return Dist(kind, tuple(args))
    if isinstance(value, (int, float, bool)):
        return Dist("choice", (value,))
    raise ConfigError(f"cannot use {value!r}{where} as a search distribution")


def canonical_key(key: str) -> str:
    return ALIASES.get(key.strip(), key.strip())


def parse_space(items: Iterable[str]) -> dict[str, Dist]:
    """``--space`` arguments: each is ``key=dist(...)`` or a YAML file mapping keys to distributions."""
    space: dict[str, Dist] = {}
    for item in items:
        p = Path(item)
        if "=" not in item and p.suffix in (".yaml", ".yml"):
            for k, v in load_yaml(p).items():
                space[canonical_key(str(k))] = parse_dist(v, str(k))
            continue
        if "=" not in item:
            raise ConfigError(f"--space {item!r}: give key=dist(...) or a .yaml file")
        k, v = item.split("=", 1)
        space[canonical_key(k)] = parse_dist(v.strip(), k.strip())
    return space


def default_space(cfg: Config) -> dict[str, Dist]:
    """What a sweep searches when no ``--space`` is given, centred on the recipe's values:
    base lr (per 256 images) log-uniform over x0.1..x10, weight decay log-uniform over x0.1..x10,
    global batch size from {B/2, B, 2B}, the temperature for methods that have one, the mask ratio for MAE."""
    lr, wd, bs = cfg.optim.base_lr, cfg.optim.weight_decay, cfg.data.batch_size
    space = {"optim.base_lr": Dist("loguniform", (_sig(lr / 10), _sig(lr * 10)))}
    name = cfg.method.name.lower()
    if name in TEMPERATURE_RANGES:
        space["method.temperature"] = Dist("loguniform", TEMPERATURE_RANGES[name])
    if name in MASK_RATIO_METHODS:
        space["method.params.mask_ratio"] = Dist("uniform", MASK_RATIO_METHODS[name])
    workers = cfg.ray.num_workers
    sizes = sorted({max(workers, bs // 2), bs, bs * 2})
    fits = tuple(s for s in sizes if s % workers == 0)
    if not fits:
        raise ConfigError(f"data.batch_size: none of {', '.join(map(str, sizes))} (B/2, B, 2B for B = {bs}) divides "
                          f"over {workers} workers per trial; set data.batch_size to a multiple of {workers}, or "
                          f"give --space batch_size=choice(...) with multiples of {workers}")
    space["data.batch_size"] = Dist("choice", fits)
    if wd > 0:
        space["optim.weight_decay"] = Dist("loguniform", (_sig(wd / 10), _sig(wd * 10)))
    return space


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def check_space(space: Mapping[str, Dist], cfg: Config, search: str = "random", grid_points: int = 3) -> None:
    """Every key must be a config key that accepts every value the search can give (``Dist.reachable``:
    the listed values of a choice/grid, the points of a grid search, the ends of a sampled range, whole
    numbers only for integer keys), batch sizes that divide over the workers, and ``method.params`` keys
    the method takes, in their valid ranges. A range is half open under random search, so
    ``mask_ratio=uniform(0.5, 1.0)`` passes there and fails under ``search="grid"``, whose last point is 1.0."""
    if not space:
        raise ConfigError("the search space is empty")
    for key, dist in space.items():
        _check_kind(key, dist, cfg)
        for value in dist.reachable(search == "grid", grid_points):
            try:
                _check_method_value(trial_config(cfg, {key: value}), key, value)
            except (ConfigError, TypeError, ValueError) as e:
                raise ConfigError(f"--space {key}={dist}: {e}") from None
    if "data.batch_size" in space:
        bad = [b for b in space["data.batch_size"].grid_points() if int(b) % cfg.ray.num_workers]
        if bad:
            raise ConfigError(f"batch sizes {bad} do not divide over {cfg.ray.num_workers} workers per trial")


def _check_kind(key: str, dist: Dist, cfg: Config) -> None:
    """A range can only be sampled where every value in it is valid: whole numbers for integer keys,
    and never for the batch size (a sampled size must divide over the workers)."""
    if key == "data.batch_size" and dist.kind not in ("choice", "grid"):
        raise ConfigError(f"--space data.batch_size={dist}: the batch size must divide over the "
                          f"{cfg.ray.num_workers} workers of a trial, so list the sizes: "
                          f"data.batch_size=choice(...) or grid(...) with multiples of {cfg.ray.num_workers}")
    if dist.kind in ("uniform", "loguniform") and _int_key(key, cfg):
        low, high = dist.args
        raise ConfigError(f"--space {key}={dist}: {key} is an integer and {dist.kind} samples fractions; "
                          f"write {key}=randint({math.ceil(low)}, {math.floor(high) + 1}) or choice(...)")


def _int_key(key: str, cfg: Config) -> bool:
    """Whether ``key`` takes integers: an int config field, or an int keyword of the method's builder."""
    if key.startswith("method.params."):
        param = _builder_params(cfg).get(key.removeprefix("method.params."))
        return param is not None and param.annotation in (int, "int")
    return field_type(key) is int


def _builder_params(cfg: Config) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``method.params`` may set for the config's method (what ``create_method``
    passes), a ``method.plugins`` method's too."""
    from ..raytrain.methods import method_builder

    try:
        builder = method_builder(cfg)
    except KeyError as e:
        raise ConfigError(f"config key 'method.name': {e.args[0]}") from None
    return {k: p for k, p in inspect.signature(builder).parameters.items() if k not in ("cfg", "backbone", "feat_dim")}


def _check_method_value(cfg: Config, key: str, value: Any) -> None:
    """A sampled method setting the method would refuse only once its trial runs: a ``method.params``
    key its builder does not take, a mask ratio outside [0, 1), a temperature that is not positive."""
    name = key.removeprefix("method.params.")
    if key.startswith("method.params."):
        allowed = _builder_params(cfg)
        if name not in allowed:
            raise ConfigError(f"method {cfg.method.name!r} takes no {key}; its method.params are: "
                              f"{', '.join(sorted(allowed)) or 'none'}")
    elif key != "method.temperature":
        return
    if name == "mask_ratio" and not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise ConfigError(f"{key} must be in [0, 1), got {value!r}")
    temperature = name in ("method.temperature", "temperature") or name.endswith("_temp")  # DINO's teacher_temp
    if temperature and not (isinstance(value, (int, float)) and value > 0):
        raise ConfigError(f"{key} must be positive, got {value!r}")


RECIPE_KEY = "recipe"  # a sampled recipe (built-in name or YAML path) replaces the base config of that trial


def trial_config(base: Config, sampled: Mapping[str, Any], forced: Mapping[str, Any] | None = None) -> Config:
    """The config a trial runs: the base with the sampled keys applied. ``optim.base_lr`` stays the lr
    per 256 images; ``effective_lr(cfg)`` applies ``optim.lr_scaling`` for the trial's batch size.
    A sampled ``recipe`` (a grid over whole configs, e.g. one resolved recipe per method in
    ``sslray study``) is loaded in place of the base, then the other sampled keys apply. ``forced``
    (the keys the sweep sets on every trial, ``SweepSpec.forced``) apply last, so a recipe keeps them."""
    keys = {k: v for k, v in sampled.items() if not k.startswith("_")}
    if RECIPE_KEY in keys:
        base = load_config(str(keys.pop(RECIPE_KEY)))
    keys.update(forced or {})
    return base.replace(**keys) if keys else base


def to_param_space(space: Mapping[str, Dist], search: str = "random", grid_points: int = 3) -> dict:
    """Tune ``param_space``: flat dotted config keys -> Tune domains (grid_search for ``--search grid``)."""
    return {k: d.to_tune(grid=search == "grid", grid_points=grid_points) for k, d in space.items()}


def grid_size(space: Mapping[str, Dist], grid_points: int = 3) -> int:
    return math.prod(len(d.grid_points(grid_points)) for d in space.values())


def describe(space: Mapping[str, Dist]) -> dict[str, str]:
    return {k: str(d) for k, d in space.items()}


def log_keys(space: Mapping[str, Dist]) -> Sequence[str]:
    """Keys whose plots use a log x axis."""
    return [k for k, d in space.items() if d.is_log]
