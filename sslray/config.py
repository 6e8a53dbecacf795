"""Typed, frozen run configuration: YAML recipes + ``key=value`` overrides, unknown keys rejected.

One tree describes a run end to end. It is dumped as YAML with every run and flattened to
``section.key`` params for MLflow, so a run can always be reproduced from what it logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class DataConfig:
    train: str = ""  # .beton written by `sslray convert`
    val: str = ""  # labelled .beton for the kNN monitor and probes
    batch_size: int = 256  # global batch (all workers together), images per step (per micro-batch: train.accum_steps)
    decode_res: int = 32  # each image is decoded once at this square size, views are cut from it
    loader_workers: int = 2  # FFCV decode threads per training worker
    train_subset: int = 0  # use only N training images, a seeded random sample of every class (0 = all)
    val_subset: int = 0  # use only N val images, a seeded random sample of every class (0 = all)
    knn_bank: int = 0  # train images in the kNN memory bank (0 = all of train_subset)
    os_cache: bool = True  # memory-map the .beton (fast when it fits in RAM; see README)
    batches_ahead: int = 2  # batches FFCV prepares ahead of the training step
    resident: bool = False  # keep every decoded uint8 image on the device (small data such as CIFAR); FFCV otherwise
    auto_batch: bool = False  # before training, halve the global batch until a step fits in device memory (lr follows)
    auto_batch_accum: bool = False  # auto_batch: raise train.accum_steps as the batch halves (effective batch, lr kept)

    def __post_init__(self):
        if self.auto_batch_accum and not self.auto_batch:  # it would do nothing, and say nothing
            raise ConfigError("config key 'data.auto_batch_accum' changes what data.auto_batch does: set "
                              "data.auto_batch=true too (or train.accum_steps for a fixed accumulation)")


@dataclass(frozen=True)
class ViewConfig:
    preset: str = "simclr"  # see sslray.datasets.views.PRESETS
    crop_size: int = 32  # output size of global crops, px
    min_scale: float = 0.08  # RandomResizedCrop lower area bound
    jitter_strength: float = 0.5  # colour jitter s: (0.8s, 0.8s, 0.8s, 0.2s)
    blur: bool = False  # Gaussian blur (off for 32-px data, as in the SimCLR CIFAR recipe)
    policy: str = "default"  # view policy on top of the preset (sslray.datasets.policies.VIEW_POLICIES)
    # Multi-crop (docs/methods.md): presets dino, swav, simclr and byol make local crops; the other methods refuse
    # them. Each local crop costs about (local_size / crop_size)^2 of a global view's compute.
    local_crops: int = -1  # local crops (dino swav simclr byol vicreg barlowtwins); -1 = preset's (6; simclr, byol 0)
    local_size: int = 0  # multi-crop local crop size, px; 0 = the preset's (96/224 of crop_size)
    backend: str = "fused"  # fused (sslray's batched kernels) | kornia (kornia.augmentation); same parameters
    mean: tuple[float, ...] = ()  # R, G, B mean of pixels in [0, 1]; empty = CIFAR's (crop_size <= 64) else ImageNet's
    std: tuple[float, ...] = ()  # R, G, B std, set with views.mean; training views, probes, kNN and export use both
    aug: Mapping = field(default_factory=dict)  # op overrides for every view, after preset and policy: {grey_p: 0}

    def __post_init__(self):
        from .augconfig import check_views  # mean, std, aug: checked by key, kept as tuples and floats

        for name, value in check_views(self).items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet18"  # any timm name, see sslray.raytrain.backbones
    cifar_stem: bool = True  # 3x3 stride-1 first conv and no max-pool (small images)
    proj_hidden_dim: int = 2048  # projector (and predictor) hidden width
    proj_out_dim: int = 128  # projector output width (the embedding the loss sees)
    sync_bn: bool = True  # global batch statistics across workers (GPU only: torch's SyncBN is CUDA-only)
    grad_checkpointing: bool = False  # recompute backbone activations in backward: less memory, ~30% more compute
    compile: bool = False  # torch.compile the backbone(s) in place; the first steps of each shape pay the compile
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    init_weights: str = ""  # start the backbone from these weights: an `sslray export` folder or a state_dict file


@dataclass(frozen=True)
class MethodConfig:
    name: str = "simclr"  # the SSL method: `sslray methods` lists them
    temperature: float = 0.5  # softmax temperature of the methods whose loss has one; the others ignore it
    params: Mapping[str, Any] = field(default_factory=dict)  # method-specific, checked by the method
    # Your own methods without forking: Python modules imported before method.name is looked up, each
    # registering builders with sslray.raytrain.methods.register_method (docs/methods.md). They are imported
    # wherever a method is built (the command's process, every Ray worker, probe/eval/export of a checkpoint,
    # which saves this key), so each must be importable there: installed, on PYTHONPATH or shipped with the job.
    plugins: tuple[str, ...] = ()  # your own methods: modules to import first, on every node (docs/methods.md)

    def __post_init__(self):
        object.__setattr__(self, "plugins", _module_names(self.plugins, "method.plugins"))


def _module_names(value: Any, key: str) -> tuple[str, ...]:
    """A list of dotted module names (``"a.b,c"`` from the command line too), checked for shape only:
    a file path or a typo'd separator is refused here, by key, before anything is imported."""
    if value is None or (isinstance(value, str) and not value.strip()):  # `method.plugins=` clears the list
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"config key {key!r}: expected a list of module names, got {value!r}")
    names = []
    for item in items:
        name = item.strip() if isinstance(item, str) else item
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(f"config key {key!r}: {item!r} is not a module name (dotted, like mypkg.ssl_methods; "
                              "a folder goes on PYTHONPATH, not here)")
        names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # sgd | lars | adamw
    base_lr: float = 0.06  # lr per 256 images; effective lr = base_lr * global_batch * train.accum_steps / 256
    lr_scaling: str = "linear"  # linear | sqrt | none
    weight_decay: float = 5e-4  # on weights; biases and norm parameters get none unless decay_bias_norm
    decay_bias_norm: bool = False  # decay biases and norm parameters too (SimSiam's, MoCo's code)
    momentum: float = 0.9  # SGD and LARS momentum
    warmup_epochs: float = 1.0  # linear lr warm-up from 0 (fractions allowed), then cosine
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    clip_grad: float = 0.0  # max gradient norm; 0 disables
    clip_mode: str = "global"  # global (one norm over all parameters) | per_param (each tensor on its own, as DINO)
    lars_eta: float = 0.001  # LARS trust coefficient: a weight's step is eta*|w|/|g| of the lr (SimCLR/BYOL: 0.001)
    lars_clip: bool = False  # LARS: cap each weight's adapted lr at the scheduled lr (the CIFAR recipes, eta 0.02)
    adam_beta1: float = 0.9  # AdamW
    adam_beta2: float = 0.999  # AdamW (MAE: 0.95)
    no_decay_lr_scale: float = 1.0  # lr of biases and norm parameters / the scheduled lr (Barlow Twins: 0.024)
    weight_decay_end: float = -1.0  # cosine from weight_decay to this over training (DINO 0.04 -> 0.4); < 0: constant


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10  # total epochs (a resumed run trains up to this many)
    seed: int = 0  # model init, views, data order and subsets
    precision: str = "auto"  # auto (bf16 on GPUs >= sm80, fp16 + loss scaling before, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True  # applied on GPU only
    knn_k: int = 200  # neighbours of the kNN monitor and of the end-of-run probe
    knn_temperature: float = 0.07  # kNN vote weight exp(similarity / T)
    knn_every: int = 1  # epochs between kNN monitor evaluations (the last epoch always runs it)
    online_probe: bool = True  # linear classifier trained every step on detached features, scored on val each epoch
    online_probe_lr: float = 1e-3  # its own Adam (constant lr, no decay) on per-dimension standardised features
    online_probe_batch: int = 128  # no projector tap (MAE): images per worker and step it encodes again (0 = all)
    log_every: int = 20  # steps between progress lines
    max_steps_per_epoch: int = 0  # cap on optimizer steps per epoch (smoke tests); 0 = full epochs
    # Gradient accumulation: each optimizer step sums the gradients of this many micro-batches of data.batch_size
    # images, so the effective batch is batch_size * accum_steps; the lr scaling, the lr/wd/momentum schedules and
    # the step counters all count optimizer steps. It keeps a recipe's lr and schedule on a smaller device, not its
    # batch-coupled terms: negatives, BatchNorm and Barlow/VICReg statistics, Sinkhorn and DINO's centre see one
    # micro-batch. Batches left over at an epoch's end (fewer than accum_steps) are not trained on.
    accum_steps: int = 1  # micro-batches per optimizer step (1 = none); effective batch = batch_size * accum_steps
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always checkpoints)
    checkpoint_every_steps: int = 0  # also checkpoint inside long epochs every N steps; 0 = off
    report_every_steps: int = 0  # report step-level loss (MLflow `step_loss`) every N steps; 0 = off
    export_backbone: bool = True  # after training: <run>/backbone/ (safetensors + JSON), also an MLflow artifact


@dataclass(frozen=True)
class MonitorConfig:
    collapse: bool = True  # collapse monitors on the last step of every epoch (features and projections)
    max_nonfinite_skips: int = 0  # consecutive NaN/inf steps skipped before the run stops; 0 = stop at the first
    check_every: int = 50  # GPU: steps between host checks of the non-finite counters (CPU: every step)
    pictures: bool = True  # view grid, schedules, MAE reconstructions, retrieval grid (PNG artifacts)
    recon_every: int = 5  # MAE: epochs between reconstruction grids (the last epoch always draws one)
    num_images: int = 8  # source images / queries per picture


@dataclass(frozen=True)
class RayConfig:
    num_workers: int = 2  # training workers (one per GPU), the global batch split over them
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per worker (FFCV decode threads run inside)
    storage: str = "./runs"  # RunConfig.storage_path: local dir, shared mount, s3:// or gs://
    name: str = ""  # run name under storage; empty = derived from method/backbone/date
    num_to_keep: int = 2  # checkpoints kept
    max_failures: int = 0  # worker-group restarts from the latest checkpoint; -1 = unlimited
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_SPREAD | STRICT_PACK


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    experiment: str = "sslray"  # MLflow experiment
    run_name: str = ""  # the run's name (MLflow and storage) when ray.name is empty; empty = method-backbone-data-date
    tensorboard: str = ""  # local/mounted folder: each run's metrics, figures, config also as TensorBoard events

    def __post_init__(self):
        if "://" in self.tensorboard:  # event files are written by the driver's node, read by `tensorboard --logdir`
            raise ConfigError(f"config key 'tracking.tensorboard' {self.tensorboard!r}: give a local or mounted "
                              "folder, not a URI")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return to_dict(self)

    def replace(self, **overrides: Any) -> "Config":
        """Return a copy with dotted-key overrides applied: ``cfg.replace(**{"optim.base_lr": 0.1})``."""
        return from_dict(merge(self.to_dict(), overrides_to_tree(overrides)))


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key."""


def to_dict(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _coerce(value: Any, typ: Any, key: str) -> Any:
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ) if isinstance(typ, str) else typ
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):  # `key=1` on a command line is read as YAML: an int
            return bool(value)
        raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}") from None
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (Mapping, list, tuple, set)):  # wrong nesting (data.train.path=...) would become text
            kind = "a mapping" if isinstance(value, Mapping) else "a list"
            raise ConfigError(f"config key {key!r}: expected text, got {kind} ({value!r})")
        return "" if value is None else str(value)
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known in {prefix.rstrip('.') or 'the root'}: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        key = prefix + name
        sub = f.type if not isinstance(f.type, str) else _SECTIONS.get(f.type)
        if sub is not None and is_dataclass(sub):
            kwargs[name] = _build(sub, value, key + ".")
        elif name == "params":
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {key!r} must be a mapping")
            kwargs[name] = dict(value)
        else:
            kwargs[name] = _coerce(value, f.type, key)
            _check_range(key, kwargs[name], value)
    return cls(**kwargs)


def _check_range(key: str, v: Any, given: Any) -> None:
    """The value limits below: a zero epoch count or a negative resolution is refused here, by key,
    not in the workers (after Ray started), where some abort the process without a Python error."""
    if key in CHOICES and v not in CHOICES[key]:
        raise ConfigError(f"config key {key!r}: expected one of {', '.join(CHOICES[key])}, got {given!r}")
    if key in CHOICES_ANY_CASE and str(v).lower() not in CHOICES_ANY_CASE[key]:
        raise ConfigError(f"config key {key!r}: expected one of {', '.join(CHOICES_ANY_CASE[key])}, got {given!r}")
    if key in POSITIVE and not v > 0:
        raise ConfigError(f"config key {key!r}: {POSITIVE[key]}; must be above 0, got {given!r}")
    if key in NON_NEGATIVE and not v >= 0:
        raise ConfigError(f"config key {key!r}: {NON_NEGATIVE[key]}; must be 0 or more, got {given!r}")
    if key in BOUNDED and not BOUNDED[key][0](v):
        raise ConfigError(f"config key {key!r}: must be {BOUNDED[key][1]}, got {given!r}")


# Keys whose value is one of a fixed set (the others are checked where they are looked up by name).
CHOICES = {"train.precision": ("auto", "bf16", "fp16", "fp32"), "optim.lr_scaling": ("linear", "sqrt", "none"),
           "model.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
           "ray.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
           "optim.clip_mode": ("global", "per_param")}
CHOICES_ANY_CASE = {"ray.use_gpu": ("auto", "true", "false", "1", "0", "yes", "no")}  # YAML's true reads "True"


# Keys that only make sense above 0 (what each is, for the message).
POSITIVE = {"data.batch_size": "global batch", "method.temperature": "softmax temperature",
            "train.knn_k": "neighbours of the kNN monitor", "train.knn_temperature": "kNN vote temperature",
            "train.knn_every": "epochs between kNN monitor runs", "train.epochs": "epochs to train",
            "ray.num_workers": "training workers", "ray.cpus_per_worker": "CPUs per worker",
            "ray.num_to_keep": "checkpoints kept", "data.decode_res": "decode resolution in pixels",
            "views.crop_size": "crop size in pixels", "model.proj_hidden_dim": "projector hidden width",
            "model.proj_out_dim": "projector output width", "train.online_probe_lr": "online probe learning rate",
            "optim.lars_eta": "LARS trust coefficient", "monitor.check_every": "steps between health checks",
            "train.accum_steps": "micro-batches per optimizer step"}

# Keys where 0 means "off", "all" or "none" and only a negative value is wrong.
NON_NEGATIVE = {"optim.base_lr": "learning rate", "optim.weight_decay": "weight decay",
                "optim.warmup_epochs": "warm-up epochs", "optim.clip_grad": "gradient clipping norm (0 = off)",
                "data.loader_workers": "loader worker processes", "data.batches_ahead": "batches decoded ahead",
                "data.train_subset": "training images used (0 = all)", "data.val_subset": "val images used (0 = all)",
                "data.knn_bank": "kNN bank images (0 = all)", "train.max_steps_per_epoch": "step cap (0 = none)",
                "train.checkpoint_every": "epochs between checkpoints", "train.log_every": "steps between log lines",
                "train.checkpoint_every_steps": "steps between mid-epoch checkpoints (0 = off)",
                "train.report_every_steps": "steps between step-level reports (0 = off)", "train.seed": "seed",
                "monitor.max_nonfinite_skips": "non-finite steps skipped (0 = stop at the first)",
                "monitor.recon_every": "epochs between reconstruction pictures",
                "train.online_probe_batch": "online probe rows per step (0 = all)",
                "monitor.num_images": "pictured images"}

# Keys with both ends bounded: (test, what the message says).
BOUNDED = {"views.min_scale": (lambda v: 0 < v <= 1, "a crop area fraction in (0, 1]"),
           "optim.min_lr_ratio": (lambda v: 0 <= v <= 1, "a fraction of the peak lr in [0, 1]"),
           "optim.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
           "optim.adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
           "optim.adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)")}


_SECTIONS = {
    c.__name__: c
    for c in (DataConfig, ViewConfig, ModelConfig, MethodConfig, OptimConfig, TrainConfig, MonitorConfig, RayConfig,
              TrackingConfig)
}


def from_dict(data: Mapping[str, Any]) -> Config:
    return _build(Config, data, "")


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k != "params":
            out[k] = merge(out[k], v)
        elif isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def field_type(key: str) -> Any:
    """The declared type of a dotted config key (``"ray.name"`` -> ``str``); None for a key that is
    unknown or lies inside a free mapping such as ``method.params``."""
    cls: Any = Config
    typ: Any = None
    for part in key.split("."):
        f = {f.name: f for f in fields(cls)}.get(part) if cls is not None else None
        if f is None:
            return None
        typ = _TYPE_NAMES.get(f.type, f.type) if isinstance(f.type, str) else f.type
        cls = _SECTIONS.get(typ) if isinstance(typ, str) else (typ if is_dataclass(typ) else None)
    return typ


_TYPE_NAMES = {"int": int, "float": float, "bool": bool, "str": str}  # field types as written under PEP 563


def parse_override(text: str) -> tuple[str, Any]:
    """``"section.key=value"`` -> ``("section.key", value)``. A ``str`` key keeps the text after ``=``
    exactly (a run name ``0755`` or ``12:30``, an experiment ``off``, a path holding `` #``); every
    other key's value is read as YAML (numbers, booleans, lists, mappings)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    k, v = text.split("=", 1)
    k = k.strip()
    if field_type(k) is str:
        return k, v
    try:
        return k, yaml.safe_load(v) if v.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None


def flag_overrides(flags: Mapping[str, Any], overrides: Sequence[str] = ()) -> dict:
    """Command-line flags (``None``: not given) then ``key=value`` overrides, as one mapping of dotted
    keys; the overrides win. Flag values are used as typed, never re-read as YAML, so ``--name 0755``
    stays the text ``0755`` and ``--data "/data/set #2/train.beton"`` keeps its whole path."""
    out = {k: v for k, v in flags.items() if v is not None}
    out.update(parse_override(t) for t in overrides)
    return out


def overrides_to_tree(overrides: Mapping[str, Any] | Sequence[str]) -> dict:
    """``["optim.base_lr=0.1", ...]`` or ``{"optim.base_lr": 0.1}`` -> nested dict. Mapping values are
    used as given; ``key=value`` texts are typed by ``parse_override``."""
    items = list(overrides.items()) if isinstance(overrides, Mapping) else [parse_override(t) for t in overrides]
    tree: dict = {}
    for key, value in items:
        parts = key.split(".")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        node[parts[-1]] = value
    return tree


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"recipe {name_or_path!r} is neither a YAML file nor a built-in recipe ({known})")


def load_yaml(path: str | os.PathLike) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a mapping at the top level")
    return data


def load_config(recipe: str | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> Config:
    """Defaults <- recipe YAML (built-in name or path) <- overrides."""
    tree: dict = to_dict(Config())
    if recipe:
        tree = merge(tree, load_yaml(recipe_path(recipe)))
    tree = merge(tree, overrides_to_tree(overrides))
    return from_dict(tree)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def flatten(cfg: Config | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"optim.base_lr": 0.06, ...}`` for MLflow params."""
    tree = cfg.to_dict() if isinstance(cfg, Config) else cfg
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its data and weight paths absolute: Ray workers may run with another cwd."""
    from .storage import absolute

    return cfg.replace(**{"data.train": absolute(cfg.data.train) or "", "data.val": absolute(cfg.data.val) or "",
                          "model.init_weights": absolute(cfg.model.init_weights) or ""})


def effective_batch(cfg: Config) -> int:
    """Images per optimizer step, over all workers and accumulated micro-batches."""
    return cfg.data.batch_size * cfg.train.accum_steps


def effective_lr(cfg: Config) -> float:
    """``base_lr * batch / 256`` (linear) or ``* sqrt(batch / 256)`` (sqrt), where batch is the effective
    batch of one optimizer step: the global batch times ``train.accum_steps``."""
    ratio = effective_batch(cfg) / 256.0
    rule = cfg.optim.lr_scaling
    if rule == "linear":
        return cfg.optim.base_lr * ratio
    if rule == "sqrt":
        return cfg.optim.base_lr * ratio**0.5
    if rule == "none":
        return cfg.optim.base_lr
    raise ConfigError(f"config key 'optim.lr_scaling': expected linear, sqrt or none, got {rule!r}")


__all__ = [
    "Config", "ConfigError", "DataConfig", "ViewConfig", "ModelConfig", "MethodConfig", "OptimConfig",
    "TrainConfig", "MonitorConfig", "RayConfig", "TrackingConfig", "load_config", "from_dict", "dump_yaml", "flatten",
    "effective_batch", "effective_lr", "absolute_paths", "flag_overrides", "parse_override", "field_type",
]
