"""What ``--checkpoint`` names, resolved into an encoder the eval protocols and ``sslray embed`` can score.

Three kinds of source:

- ``checkpoint``: an sslray ``state.pt`` (a checkpoint or run folder, local or ``s3://``): the method is
  rebuilt from its config; the eval transform, seeds and precision are the checkpoint's own.
- ``export``: a folder written by ``sslray export`` (or its ``backbone.safetensors`` / ``backbone.json``):
  rebuilt from ``backbone.json``; its input size, mean and std are the eval transform.
- ``timm``: ``timm:<model name>``, built by timm without downloading anything, with the weights of
  ``--weights FILE`` (a state_dict of another tool: ``.safetensors``, ``.pt``, ``.pth``) or, without
  it, timm's own seeded random init.

Each gives the pretrained backbone and a random-init baseline of the same architecture, the eval
settings as an sslray ``Config`` (the checkpoint's; for the others sslray's defaults with this
backbone, eval transform and decode resolution), an identity for the feature cache key, and whether
an MLflow run can be looked up (sslray checkpoints only; the others log with ``--run-id`` alone).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

TIMM_PREFIX = "timm:"
KINDS = ("checkpoint", "export", "timm")
DEFAULT_CROP = 224  # the crop size when neither backbone.json, --crop-size nor the data's manifest gives one


@dataclass(frozen=True)
class SourceOptions:
    """The ``sslray eval`` / ``sslray embed`` options that shape a source beside ``--checkpoint``."""

    weights: Optional[str] = None  # --weights: a state_dict for a timm:<name> source
    crop_size: int = 0  # --crop-size; 0: backbone.json's, the checkpoint's, else the data's resolution
    mean: tuple[float, ...] = ()  # --mean R,G,B of pixels in [0, 1]; (): backbone.json's, else ImageNet's
    std: tuple[float, ...] = ()  # --std R,G,B
    cifar_stem: bool = False  # --cifar-stem: a timm ResNet with a 3x3 stride-1 first conv and no max-pool

    def __post_init__(self):
        if self.crop_size < 0:
            raise ValueError(f"--crop-size must be a positive number of pixels, got {self.crop_size}")
        for name, v in (("--mean", self.mean), ("--std", self.std)):
            if v and len(v) != 3:
                raise ValueError(f"{name} needs 3 values (R,G,B), got {list(v)}")
        if self.std and min(self.std) <= 0:
            raise ValueError(f"--std needs values above 0, got {list(self.std)}")
        if bool(self.mean) != bool(self.std):
            raise ValueError("--mean and --std go together: give both or neither")


@dataclass
class EncoderSource:
    """A resolved ``--checkpoint``: build its backbones with ``backbone(init)``."""

    kind: str  # one of KINDS
    name: str  # as given
    label: str  # what reports and logs call it
    cfg: Any  # sslray.config.Config: the eval settings (transform, decode resolution, seed, precision, kNN T)
    identity: dict  # the feature cache key's part for the weights
    home: Path  # the feature cache's default folder (features/ in it)
    transform_from: str  # where the eval transform came from, for the log
    state_path: Optional[Path] = None  # the state.pt of an sslray checkpoint
    method: Optional[Callable[[], Any]] = field(default=None, repr=False)  # its whole method (embed --head)
    _pretrained: Callable[[], Any] = field(default=None, repr=False)
    _random: Callable[[], Any] = field(default=None, repr=False)

    def backbone(self, init: str):
        """A fresh module: ``pretrained`` (the source's weights) or ``random_init`` (same architecture,
        seeded by ``cfg.train.seed`` + ``RANDOM_INIT_SEED_OFFSET``, as for every sslray checkpoint)."""
        if init == "pretrained":
            return self._pretrained()
        if init == "random_init":
            return self._random()
        raise ValueError(f"unknown backbone init {init!r}; expected pretrained or random_init")

    def describe(self) -> str:
        """One line for the log: the source and its eval transform."""
        v = self.cfg.views
        from ..datasets.views import normalisation

        mean, std = normalisation(v)
        what = {"checkpoint": "sslray checkpoint", "export": "sslray export", "timm": "timm model"}[self.kind]
        return (f"eval: {what} {self.label}; eval transform {v.crop_size} px, mean "
                f"{[round(x, 4) for x in mean]}, std {[round(x, 4) for x in std]} ({self.transform_from}), "
                f"images decoded at {self.cfg.data.decode_res} px")


def source_kind(checkpoint: str | os.PathLike) -> str:
    """The kind of source ``checkpoint`` names, from its spelling and files alone (nothing is loaded)."""
    from ..export import META, WEIGHTS
    from ..storage import is_remote

    text = str(checkpoint)
    if text.startswith(TIMM_PREFIX):
        return "timm"
    if is_remote(text):  # an export folder holds backbone.json (one probe of the store); else a checkpoint
        from ..storage import exists, join

        return "export" if text.endswith((WEIGHTS, META)) or exists(join(text, META)) else "checkpoint"
    p = Path(text)
    if p.is_dir():
        return "export" if (p / META).exists() or (p / WEIGHTS).exists() else "checkpoint"
    return "export" if p.name in (WEIGHTS, META) or p.suffix == ".safetensors" else "checkpoint"


def data_resolution(paths: Sequence[str]) -> Optional[int]:
    """The short side of the largest stored image of the first split whose manifest says (None without one)."""
    from ..datasets.convert import read_manifest

    for p in paths:
        if p and os.path.isfile(p):
            m = read_manifest(p) or {}
            if m.get("max_height") and m.get("max_width"):
                return int(min(m["max_height"], m["max_width"]))
    return None


def resolve_source(checkpoint: str | os.PathLike, opts: Optional[SourceOptions] = None,
                   data: Sequence[str] = ()) -> EncoderSource:
    """``checkpoint`` (what ``--checkpoint`` says) -> an ``EncoderSource``. ``data``: the splits it will
    score, whose resolution sets the decode size (and the crop size when nothing else does)."""
    opts = opts or SourceOptions()
    kind = source_kind(checkpoint)
    if opts.weights and kind != "timm":
        raise ValueError(f"--weights goes with --checkpoint timm:<model name>; {checkpoint} is an sslray {kind} "
                         "that holds its own weights")
    if opts.cifar_stem and kind != "timm":
        raise ValueError(f"--cifar-stem goes with --checkpoint timm:<model name>; {checkpoint}'s stem is in its "
                         "config or backbone.json")
    if kind == "checkpoint":
        return _checkpoint(str(checkpoint), opts)
    if kind == "export":
        return _export(str(checkpoint), opts, data)
    return _timm(str(checkpoint), opts, data)


def _transform_overrides(opts: SourceOptions) -> dict:
    out = {"views.crop_size": opts.crop_size} if opts.crop_size else {}
    if opts.mean:
        out.update({"views.mean": list(opts.mean), "views.std": list(opts.std)})
    return out


def _given(opts: SourceOptions, base: str) -> str:
    given = [n for n, v in (("--crop-size", opts.crop_size), ("--mean/--std", opts.mean)) if v]
    return f"{', '.join(given)}; else {base}" if given else base


def _checkpoint(checkpoint: str, opts: SourceOptions) -> EncoderSource:
    from ..raytrain.evaluate import find_state, random_init_model, read_checkpoint

    state_path = find_state(checkpoint)  # FileNotFoundError naming the path
    try:
        cfg, state = read_checkpoint(state_path, "cpu")
    except ValueError as e:
        if "holds no sslray config" in str(e):  # another tool's state_dict: say how to evaluate it
            raise ValueError(f"{e}. To evaluate another tool's weights: --checkpoint timm:<model name> "
                             f"--weights {state_path}") from None
        raise
    from .features import _file_id

    def method():
        from ..raytrain.methods import create_method

        model = create_method(cfg)  # the checkpoint's own config: a ViT's input size is part of its weights
        model.load_state_dict(state["model"])
        return model

    if any(k.startswith("backbone.patch_embed.") for k in state["model"]):  # a ViT: built for one size
        _check_fixed_size(opts, cfg.views.crop_size, str(state_path))
    over = _transform_overrides(opts)
    return EncoderSource("checkpoint", checkpoint, str(state_path), cfg.replace(**over) if over else cfg,
                         _file_id(str(state_path)), state_path.parent, _given(opts, "the checkpoint's views"),
                         state_path, method, lambda: method().backbone, lambda: random_init_model(cfg).backbone)


def _check_fixed_size(opts: SourceOptions, size: int, where: str) -> None:
    """``--crop-size`` for a backbone built for one input size (a ViT's position embedding): that size only."""
    if opts.crop_size and opts.crop_size != size:
        raise ValueError(f"--crop-size {opts.crop_size}: the backbone of {where} takes {size}-px inputs (a ViT, "
                         f"its position embedding is for that size); leave --crop-size out or give {size}")


def _settings(backbone: str, crop: int, mean, std, data: Sequence[str], opts: SourceOptions):
    """sslray's default config with this backbone and eval transform; images decoded at the data's own
    resolution when it is larger than the crop (the eval transform resizes them), else at the crop size."""
    from ..config import Config

    res = data_resolution(data)
    return Config().replace(**{"model.backbone": backbone, "views.crop_size": crop, "views.mean": list(mean),
                               "views.std": list(std), "data.decode_res": max(crop, res or crop),
                               "model.cifar_stem": opts.cifar_stem})


def _seeded(cfg, build: Callable[[], Any], offset: int):
    from ..raytrain.rng import seed_everything

    seed_everything(cfg.train.seed + offset)
    return build()


def _export(path: str, opts: SourceOptions, data: Sequence[str]) -> EncoderSource:
    from ..export import WEIGHTS, build_from_meta, load_backbone, local_export
    from ..raytrain.evaluate import RANDOM_INIT_SEED_OFFSET
    from .features import _file_id

    path = str(local_export(path))  # s3:// or gs://: this machine's copy of the export's files
    # FileNotFoundError / ValueError naming the file; the weights are checked to fit, and kept for the first use
    backbone, meta = load_backbone(path)
    built = [backbone]
    if meta.get("timm_kwargs", {}).get("img_size"):  # a ViT: built for one size
        _check_fixed_size(opts, int(meta["timm_kwargs"]["img_size"]), path)
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    weights = p if p.suffix == ".safetensors" else folder / WEIGHTS
    crop = opts.crop_size or int(meta.get("input_size") or 0) or data_resolution(data) or DEFAULT_CROP
    im_mean, im_std = _imagenet()
    mean = opts.mean or tuple(meta.get("mean") or ()) or im_mean
    std = opts.std or tuple(meta.get("std") or ()) or im_std
    # The run's seed (exports from before it was recorded: 0): the baseline and subsets are the checkpoint's
    cfg = _settings(meta["backbone"], crop, mean, std, data, opts).replace(**{"train.seed": int(meta.get("seed", 0))})
    ident = {"kind": "export", "weights": _file_id(str(weights)),
             "build": {k: meta[k] for k in ("backbone", "cifar_stem", "timm_kwargs")}}
    return EncoderSource("export", path, str(weights), cfg, ident, folder, _given(opts, "backbone.json"),
                         None, None, lambda: built.pop() if built else load_backbone(path)[0],
                         lambda: _seeded(cfg, lambda: build_from_meta(meta), RANDOM_INIT_SEED_OFFSET))


def _imagenet() -> tuple[tuple[float, ...], tuple[float, ...]]:
    from ..datasets.views import IMAGENET_MEAN, IMAGENET_STD

    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def check_timm_name(name: str) -> None:
    """A timm model name (timm's registry; nothing is downloaded), else a ValueError with close names."""
    import difflib

    import timm

    if not name:
        raise ValueError(f"--checkpoint {TIMM_PREFIX}: no model name after {TIMM_PREFIX!r} (e.g. timm:resnet50)")
    base = name.split(".", 1)[0]  # resnet50.a1_in1k: the tag names pretrained weights, which come from --weights
    if not timm.is_model(base):
        near = difflib.get_close_matches(base, timm.list_models(), n=3)
        raise ValueError(f"--checkpoint {TIMM_PREFIX}{name}: unknown timm model {base!r}"
                         + (f"; did you mean {', '.join(near)}?" if near else ""))


def _timm(checkpoint: str, opts: SourceOptions, data: Sequence[str]) -> EncoderSource:
    from torch import nn

    from ..export import init_backbone
    from ..raytrain.backbones import create_backbone
    from ..raytrain.evaluate import RANDOM_INIT_SEED_OFFSET
    from ..storage import cache_root
    from .features import _file_id

    name = checkpoint[len(TIMM_PREFIX):].strip()
    check_timm_name(name)
    base = name.split(".", 1)[0]
    weights = opts.weights
    if weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"--weights {weights} not found (a state_dict file: .safetensors, .pt or .pth)")
    res = data_resolution(data)
    crop = opts.crop_size or res or DEFAULT_CROP
    mean, std = (opts.mean, opts.std) if opts.mean else _imagenet()
    base_how = ("the data's resolution" if res else f"the default {DEFAULT_CROP} px") + " and ImageNet's mean and std"
    cfg = _settings(base, crop, mean, std, data, opts)

    def build():
        return create_backbone(base, cifar_stem_=opts.cifar_stem, img_size=crop)  # a fixed-size model at the crop

    def pretrained():
        if not weights:  # timm's own init, seeded: the same "pretrained" features every time
            return _seeded(cfg, build, 0)
        holder = nn.Module()  # init_backbone loads into `.backbone`, dropping a classifier the file may hold
        holder.backbone = build()
        try:
            init_backbone(holder, weights)
        except ValueError as e:
            raise ValueError(str(e).replace("model.init_weights: ", "--weights ", 1)
                             .replace("(model.backbone / model.cifar_stem / patch size)",
                                      f"(--checkpoint {checkpoint} / --cifar-stem)")) from None
        return holder.backbone

    if weights:
        home, how = Path(weights).resolve().parent, f"the weights of {weights}"
    else:
        home = cache_root().parent / "timm"  # beside the copies of remote files, in sslray's cache
        how = "timm's random init (no --weights)"
    built = [pretrained()] if weights else []  # a file that does not fit fails now, before any data is read
    ident = {"kind": "timm", "model": base, "cifar_stem": opts.cifar_stem,
             "weights": _file_id(weights) if weights else f"timm init(seed={cfg.train.seed})"}
    return EncoderSource("timm", checkpoint, f"{TIMM_PREFIX}{base} with {how}", cfg, ident, home,
                         _given(opts, base_how), None, None, lambda: built.pop() if built else pretrained(),
                         lambda: _seeded(cfg, build, RANDOM_INIT_SEED_OFFSET))


__all__ = ["EncoderSource", "KINDS", "SourceOptions", "check_timm_name", "resolve_source", "source_kind"]
