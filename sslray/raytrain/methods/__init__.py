"""SSL methods: registered builders that compose backbone + heads + loss (+ teacher / queue).

A method is an ``nn.Module`` with:
  ``backbone``            the encoder whose pooled features are probed,
  ``family``              contrastive | non-contrastive | clustering | distillation | MIM,
  ``forward(views)``      -> ``{"loss": tensor, ...scalar logs}``,
  optional ``on_step(step, total_steps)`` for momentum teachers and schedules,
  optional ``compile_targets()`` the modules ``model.compile`` compiles (default: every module of
  the backbone's class, i.e. the student and its EMA teacher copies).

Each registered builder carries ``.family`` and ``.default_views`` (the view preset its recipes name),
and ``.multicrop = True`` if its method takes local crops (``views.local_crops`` > 0) after the two
global views.
Shared pieces live in small helpers: ``_ema`` (momentum teachers), ``_queue`` (feature queues),
``_multicrop`` (multi-resolution crops).

Methods outside this package (plugins) register the same way from their own module, which the config
names in ``method.plugins``; ``import_plugins`` imports them wherever a method is looked up
(docs/methods.md has the builder contract and an example).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable

from torch import nn

from ...config import ConfigError, _coerce
from ...registry import Registry
from ..backbones import check_shapes, create_backbone

METHODS: Registry[Callable[..., nn.Module]] = Registry("method")
register_method = METHODS.register


def build_backbone(cfg) -> tuple[nn.Module, int]:
    bb = create_backbone(cfg.model.backbone, cifar_stem_=cfg.model.cifar_stem, img_size=cfg.views.crop_size)
    return bb, check_shapes(bb, cfg.views.crop_size)


PLUGIN_HINT = ("a plugin module must be importable wherever methods are built (this process, every Ray worker "
               "on every node, and later probe/eval/export): install it, put its folder on PYTHONPATH, or ship it "
               "with the job (docs/methods.md)")


def import_plugins(modules: Iterable[str]) -> list[str]:
    """Import the ``method.plugins`` modules, whose imports register their methods; returns the names
    of the methods they added. Importing a module already imported does nothing, so every lookup can
    call this. A module that cannot be found, or fails while importing, is a ConfigError naming the key."""
    before = set(METHODS.names())
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):  # the plugin itself, not a dependency
                raise ConfigError(f"config key 'method.plugins': no module named {e.name!r} (importing {name!r}); "
                                  f"{PLUGIN_HINT}") from None
            raise ConfigError(f"config key 'method.plugins': importing {name!r} failed: {e}") from e
        except Exception as e:  # its own code failed: the chained traceback points into it
            raise ConfigError(f"config key 'method.plugins': importing {name!r} failed: "
                              f"{type(e).__name__}: {e}") from e
    return sorted(set(METHODS.names()) - before)


def method_builder(cfg) -> Callable[..., nn.Module]:
    """The registered builder ``cfg.method.name`` names, after importing ``cfg.method.plugins``."""
    import_plugins(cfg.method.plugins)
    try:
        return METHODS.get(cfg.method.name)
    except KeyError as e:
        where = f" (after importing method.plugins {', '.join(cfg.method.plugins)})" if cfg.method.plugins else ""
        raise KeyError(e.args[0] + where) from None


def recipe_config(method: str, recipe: str | None = None, overrides: Iterable[str] = (), method_views: bool = False):
    """``method``'s config: ``recipe`` if given, else its built-in ``<method>_cifar10`` recipe, else the
    defaults with the method's own view preset; ``overrides`` on top. ``method_views``: the method's own
    preset with any recipe but its own (a recipe shared by a study's methods). Its ``method.plugins`` are
    imported first, so a plugin's method is found; an unknown method fails here, listing the known."""
    from ...config import CONFIG_DIR, load_config

    own = f"{method}_cifar10"
    if recipe is None and (CONFIG_DIR / f"{own}.yaml").exists():
        recipe = own
    named = [f"method.name={method}"]
    cfg = load_config(recipe, named + list(overrides))
    builder = method_builder(cfg)
    if recipe is not None and (recipe == own or not method_views):
        return cfg
    return load_config(recipe, named + [f"views.preset={getattr(builder, 'default_views', 'simclr')}", *overrides])


def _builder_and_params(cfg) -> tuple[Callable[..., nn.Module], dict]:
    """The method's builder and ``cfg.method.params``, which must match its keyword args, each value
    read as its annotated type (bool, int, float, str) the way other config keys are: a ``"no"`` for
    a bool switch is false, not a true-looking string; a value that cannot be read as its type is
    refused with an error naming the key."""
    builder = method_builder(cfg)
    params = dict(cfg.method.params)
    signature = inspect.signature(builder).parameters
    allowed = set(signature) - {"cfg", "backbone", "feat_dim"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join('method.params.' + k for k in unknown)} for method "
            f"{cfg.method.name!r}; it accepts: {', '.join(sorted(allowed)) or 'none'}"
        )
    check_local_crops(cfg, builder)
    return builder, {k: _coerce(v, signature[k].annotation, f"method.params.{k}") for k, v in params.items()}


def multicrop_methods() -> list[str]:
    """The registered methods whose builder says they take local crops (``.multicrop``)."""
    return [name for name in METHODS.names() if getattr(METHODS.get(name), "multicrop", False)]


def check_local_crops(cfg, builder) -> None:
    """``views.local_crops`` > 0 only for a method that takes local crops: any other would fail at its
    first step on the extra views (or, a plugin that ignores them, pay for crops it never reads)."""
    if getattr(builder, "multicrop", False) or cfg.views.local_crops == 0:
        return
    from ...datasets.views import local_crop_count

    try:
        n = local_crop_count(cfg.views)
    except ValueError:  # local crops on a preset that makes none: check_method_config names that next
        n = cfg.views.local_crops
    if n > 0:
        said = "" if cfg.views.local_crops > 0 else f" (views.preset={cfg.views.preset!r} makes {n} by default)"
        raise ConfigError(f"config key 'views.local_crops'{said}: method {cfg.method.name!r} takes no local crops "
                          f"(multi-crop methods: {', '.join(multicrop_methods())}); set views.local_crops=0")


def check_method_config(cfg) -> None:
    """What the workers would refuse when they first build the run, checked where the command runs,
    before Ray starts: the method and its ``method.params`` keys, the view preset and backend, the
    optimizer. Each error names the config key."""
    from ...datasets.views import BACKENDS, PRESETS
    from ..optim import OPTIMIZERS

    try:
        _builder_and_params(cfg)
        for key, registry in (("views.preset", PRESETS), ("views.backend", BACKENDS)):
            try:
                registry.get(getattr(cfg.views, key.split(".")[1]))
            except KeyError as e:
                raise ConfigError(f"config key {key!r}: {e.args[0]}") from None
    except KeyError as e:  # the method itself
        raise ConfigError(f"config key 'method.name': {e.args[0]}") from None
    if cfg.optim.name.lower() not in OPTIMIZERS:
        raise ConfigError(f"config key 'optim.name': unknown optimizer {cfg.optim.name!r} ({', '.join(OPTIMIZERS)})")
    check_backbone_name(cfg.model.backbone)


def check_backbone_name(name: str) -> None:
    """A registered backbone or a timm model name (timm's registry, no weights downloaded)."""
    import difflib

    import timm

    from ..backbones import BACKBONES

    if name in BACKBONES or timm.is_model(name) or name.startswith(("hf-hub:", "hf_hub:")):
        return
    near = difflib.get_close_matches(name, [*BACKBONES.names(), *timm.list_models()], n=3)
    raise ConfigError(f"config key 'model.backbone': unknown backbone {name!r} (neither sslray's nor a timm model)"
                      + (f"; did you mean {', '.join(near)}?" if near else ""))


def create_method(cfg) -> nn.Module:
    """Build the method named by ``cfg.method.name`` (imported from ``cfg.method.plugins`` first, so a
    Ray worker or a reloaded checkpoint finds a plugin's method); ``cfg.method.params`` must match its
    keyword args."""
    builder, params = _builder_and_params(cfg)
    backbone, feat_dim = build_backbone(cfg)
    model = builder(cfg=cfg, backbone=backbone, feat_dim=feat_dim, **params)
    if cfg.model.grad_checkpointing:  # on the backbone the method trains (MAE may have rebuilt it)
        bb = model.backbone
        if not hasattr(bb, "set_grad_checkpointing"):
            raise ValueError(f"config key 'model.grad_checkpointing': backbone {cfg.model.backbone!r} "
                             f"({type(bb).__name__}) has no set_grad_checkpointing")
        bb.set_grad_checkpointing(True)
    return model


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_method(model: nn.Module, mode: str = "default") -> list[nn.Module]:
    """``model.compile``: ``torch.compile`` the modules that carry the step's compute, in place.

    In place (``nn.Module.compile``) keeps parameter names, so checkpoints load with or without it
    and a compiled run resumes an eager one. The targets are the method's ``compile_targets()`` when
    it names them (MAE: its encoder and decoder blocks, since it calls the blocks, not the ViT),
    else every module of the backbone's class: the student and the EMA teacher copies. Heads, losses,
    queues and collectives stay eager (small, and full of Python state). Returns the targets."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"config key 'model.compile_mode': expected one of {', '.join(COMPILE_MODES)}, "
                          f"got {mode!r}")
    if hasattr(model, "compile_targets"):
        targets = list(model.compile_targets())
    else:
        kind = type(model.backbone)
        targets = [m for m in model.modules() if type(m) is kind]
    for m in targets:
        m.compile(mode=mode)
    return targets


from . import dino, ijepa, mae, moco, nnclr, redundancy, siamese, simclr, swav, vicregl  # noqa: F401  (register)

__all__ = ["COMPILE_MODES", "METHODS", "build_backbone", "check_local_crops", "compile_method", "create_method",
           "import_plugins", "method_builder", "multicrop_methods", "register_method"]
