"""`sslray export`: a checkpoint's pretrained backbone as a standalone file for downstream use.

A training checkpoint (``state.pt``) holds the whole method: backbone, projector and predictor
heads, EMA teachers, queues, the optimizer and RNG state, pickled with sslray's config. What a user
takes downstream is the backbone alone. ``export_backbone`` writes it as

- ``backbone.safetensors``: the backbone's ``state_dict`` under timm's own parameter names (no
  ``backbone.`` prefix, no pickle; safetensors is what timm and the Hugging Face hub load), and
- ``backbone.json``: how to rebuild it (the timm model name and the ``timm.create_model`` keyword
  arguments, the CIFAR stem, the feature width) and how to feed it (input size, mean and std of
  the normalisation the views used), plus where it came from (method, epoch, step, checkpoint).

``load_backbone`` rebuilds and loads it with sslray; without sslray, ``timm.create_model(name,
num_classes=0, **timm_kwargs)`` and ``load_state_dict(safetensors.torch.load_file(...))`` give the
same module (and, for ``cifar_stem``, a 3x3 stride-1 ``conv1``, or first conv of a deep stem, and no ``maxpool``). Every export
rebuilds the written file the same way and compares it with the checkpoint's backbone before it
renames the files into place, so an export that would not load is never left behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # torch loads inside the functions that use it: `sslray --help` must not wait for it
    import torch
    from torch import nn

WEIGHTS = "backbone.safetensors"
META = "backbone.json"
FORMAT = "sslray-backbone/1"
EMBEDDED_KEY = "sslray"  # safetensors header key holding the metadata JSON as well
WHICH = ("student", "teacher")


def teacher_backbone(model: nn.Module) -> Optional[nn.Module]:
    """The EMA teacher's copy of the backbone (BYOL, MoCo v2/v3, DINO), or None for methods without one.

    Every EMA teacher is built as ``EMATeacher(backbone, head...)``, so its first module is the backbone.
    """
    from .raytrain.methods._ema import EMATeacher

    for m in model.modules():
        if isinstance(m, EMATeacher) and type(m.module[0]) is type(model.backbone):
            return m.module[0]
    return None


def timm_kwargs(backbone: nn.Module, cfg) -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments that rebuild ``backbone`` (besides ``num_classes=0``)."""
    kw: dict[str, Any] = {}
    pe = getattr(backbone, "patch_embed", None)
    if pe is not None and hasattr(pe, "patch_size"):  # a ViT: its input size and patch size (MAE may change it)
        kw["img_size"] = int(cfg.views.crop_size)
        kw["patch_size"] = int(pe.patch_size[0])
        from timm.models.vision_transformer import VisionTransformer
        from torch.nn import Identity

        if isinstance(backbone, VisionTransformer):  # I-JEPA's: no class token, its patch tokens averaged
            if backbone.cls_token is None:
                kw["class_token"] = False
            if backbone.global_pool != "token":
                kw["global_pool"] = backbone.global_pool
            fc_norm = not isinstance(backbone.fc_norm, Identity)  # timm's default: on with pooled patches
            if fc_norm != (backbone.global_pool in ("avg", "avgmax", "max")):
                kw["fc_norm"] = fc_norm
    return kw


def build_from_meta(meta: dict) -> nn.Module:
    from .raytrain.backbones import create_backbone

    return create_backbone(meta["backbone"], cifar_stem_=bool(meta["cifar_stem"]), **meta["timm_kwargs"])


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export: {out} is a file; give a folder for {WEIGHTS} and {META}")
    taken = [out / n for n in (WEIGHTS, META) if (out / n).exists()]
    if taken and not force:
        raise FileExistsError(f"export: {', '.join(map(str, taken))} already exist(s); pass --force to replace")


def export_backbone(checkpoint: str | os.PathLike, out: str | os.PathLike, which: str = "student",
                    force: bool = False) -> Path:
    """Write ``<out>/backbone.safetensors`` and ``<out>/backbone.json`` from a checkpoint (a ``state.pt``,
    a checkpoint folder, or a run folder: its newest checkpoint). Returns ``out``."""
    import torch

    from . import __version__
    from .raytrain.evaluate import find_state, load_checkpoint
    from .storage import remote_source

    if which not in WHICH:
        raise ValueError(f"export: which must be one of {', '.join(WHICH)}, got {which!r}")
    out = Path(out)
    _check_out(out, force)
    state_path = find_state(checkpoint)
    cfg, model, state = load_checkpoint(state_path, torch.device("cpu"))
    backbone = model.backbone if which == "student" else teacher_backbone(model)
    if backbone is None:
        raise ValueError(f"export: method {cfg.method.name!r} has no EMA teacher; export the student "
                         f"(the default) instead of --teacher")
    meta = {
        **rebuild_meta(backbone, cfg),
        "which": which,
        "method": cfg.method.name,
        "epoch": int(state.get("epoch", 0)),
        "step": int(state.get("step", 0)),
        "checkpoint": remote_source(state_path) or str(state_path.resolve()),
        "versions": {"sslray": __version__, "torch": torch.__version__, "timm": _timm_version()},
    }
    write_export(out, backbone, meta)
    return out


def rebuild_meta(backbone: nn.Module, cfg) -> dict[str, Any]:
    """The metadata keys that rebuild ``backbone`` (format, timm name and kwargs, CIFAR stem, width)
    and feed it (input size, the run's eval normalisation); ``seed``: the run's ``train.seed``, which
    ``sslray eval`` of the export seeds its random-init baseline and subsets with, as for the checkpoint."""
    from .datasets.views import eval_transform

    tf = eval_transform(cfg.views)
    return {
        "format": FORMAT,
        "backbone": cfg.model.backbone,
        "cifar_stem": bool(cfg.model.cifar_stem),
        "timm_kwargs": timm_kwargs(backbone, cfg),
        "num_features": int(getattr(backbone, "num_features")),
        "input_size": int(cfg.views.crop_size),
        "mean": [round(float(v), 6) for v in tf.mean.flatten()],
        "std": [round(float(v), 6) for v in tf.std.flatten()],
        "seed": int(cfg.train.seed),
    }


def write_export(out: Path, backbone: nn.Module, meta: dict) -> None:
    """``backbone``'s weights and ``meta`` into ``out/backbone.safetensors`` and ``out/backbone.json``,
    read back and compared before they are renamed into place."""
    from safetensors.torch import load_file, save_file

    weights = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_m = out / (WEIGHTS + ".tmp"), out / (META + ".tmp")
    try:
        # The whole metadata under one key: the file then rebuilds on its own, and safetensors writes a
        # one-key header the same way every time (several keys come out in a random order).
        save_file(weights, str(tmp_w), metadata={EMBEDDED_KEY: json.dumps(meta, sort_keys=True)})
        tmp_m.write_text(json.dumps(meta, indent=2) + "\n")
        _verify(tmp_w, meta, weights, load_file)
        os.chmod(tmp_w, tmp_m.stat().st_mode & 0o777)  # the umask's mode, like the JSON (not safetensors' 0600)
        os.replace(tmp_w, out / WEIGHTS)
        os.replace(tmp_m, out / META)
    finally:
        for t in (tmp_w, tmp_m):
            t.unlink(missing_ok=True)


def _verify(path: Path, meta: dict, weights: dict, load_file) -> None:
    """Rebuild from the metadata alone, load the file strictly, and compare every tensor."""
    import torch

    rebuilt = build_from_meta(meta)
    loaded = load_file(str(path))
    rebuilt.load_state_dict(loaded, strict=True)
    for k, v in weights.items():
        if not torch.equal(loaded[k], v):
            raise RuntimeError(f"export: tensor {k} read back from {path} differs from the checkpoint's")


def local_export(path: str | os.PathLike) -> Path:
    """An export (its folder or one of its files) on this machine: a remote one's folder is copied into
    the local cache (once) and that copy returned; a local path as it is."""
    from .storage import fetch, is_remote

    if not is_remote(path):
        return Path(path)
    uri = str(path).rstrip("/")
    return fetch(uri.rsplit("/", 1)[0] if uri.endswith((WEIGHTS, META)) else uri)


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """An exported backbone folder (or its ``backbone.safetensors``) -> (module in eval mode, metadata).

    ``module(x)`` gives pooled features of width ``meta["num_features"]`` for ``x`` normalised with
    ``meta["mean"]`` / ``meta["std"]`` at ``meta["input_size"]`` px. A URI (``s3://.../backbone``)
    is copied into the local cache first.
    """
    from safetensors.torch import load_file

    from .storage import is_remote

    p = local_export(path)
    if not is_remote(path) and not p.exists():  # never fall back to the parent folder: it may hold another export
        raise FileNotFoundError(f"load_backbone: {p} not found (an export folder, or its {WEIGHTS} / {META})")
    if p.is_file() and p.name == META:
        p = p.parent
    folder = p if p.is_dir() else p.parent
    meta_path, weights_path = folder / META, (p if p.is_file() else folder / WEIGHTS)
    if not weights_path.exists():
        raise FileNotFoundError(f"load_backbone: {weights_path} not found "
                                f"(write it with `sslray export CHECKPOINT {folder}`)")
    source = meta_path if meta_path.exists() else weights_path  # where the metadata is read from
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"load_backbone: {meta_path} is not valid JSON ({e})") from None
    else:  # the weights file copied on its own: its header holds the same metadata
        meta = embedded_meta(weights_path)
        if meta is None:
            raise FileNotFoundError(f"load_backbone: {meta_path} not found, and {weights_path} carries no sslray "
                                    f"metadata (write both with `sslray export CHECKPOINT {folder}`)")
    missing = [k for k in ("format", "backbone", "cifar_stem", "timm_kwargs") if k not in meta]
    if missing or meta.get("format") != FORMAT:
        raise ValueError(f"load_backbone: {source} is not an sslray backbone export "
                         f"(format {meta.get('format')!r}, missing keys {missing})")
    model = build_from_meta(meta)
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    return model.to(device).eval(), meta


def embedded_meta(weights_path: str | os.PathLike) -> Optional[dict]:
    """The export metadata kept in a weights file's safetensors header, or None (older exports, other files)."""
    from safetensors import safe_open

    with safe_open(str(weights_path), "pt") as f:
        text = (f.metadata() or {}).get(EMBEDDED_KEY)
    return json.loads(text) if text else None


def export_to(checkpoint: str | os.PathLike, out: str | os.PathLike, which: str = "student",
              force: bool = False) -> tuple[Path, str]:
    """``export_backbone`` to a local folder or to object storage (``s3://.../backbone``): a remote
    ``out`` is written in the local cache first, then uploaded (weights before metadata, so a reader
    that finds the JSON finds whole weights). Returns (local folder, where the files went)."""
    from .storage import exists, is_remote, join, local_mirror, upload

    if not is_remote(out):
        local = export_backbone(checkpoint, out, which, force)
        return local, str(local)
    out = str(out).rstrip("/")
    taken = [join(out, n) for n in (WEIGHTS, META) if exists(join(out, n))]
    if taken and not force:
        raise FileExistsError(f"export: {', '.join(taken)} already exist(s); pass --force to replace")
    local = export_backbone(checkpoint, local_mirror(out), which, force=True)
    for name in (WEIGHTS, META):
        upload(local / name, join(out, name))
    return local, out


def export_after_training(checkpoint: Optional[str], tracker, log=print) -> Optional[str]:
    """``sslray pretrain``'s last step: the final backbone into ``<run>/backbone/`` beside the
    checkpoints (on the run's storage, local or ``s3://``...), and the same two files to the MLflow
    run under ``backbone/``. Returns where it went, or None (the run is never failed by this)."""
    if not checkpoint:
        log("sslray: backbone not exported (the run reported no checkpoint)")
        return None
    try:  # beside the checkpoints, on the run's own storage
        out, dest = export_to(checkpoint, f"{str(checkpoint).rstrip('/').rsplit('/', 1)[0]}/backbone", force=True)
        for name in (WEIGHTS, META):
            tracker.log_artifact(out / name, "backbone")
    except Exception as e:  # noqa: BLE001 - the run is trained and checkpointed; its probe still runs
        log(f"sslray: warning: backbone export failed ({type(e).__name__}: {e}); the checkpoint {checkpoint} "
            f"is intact: `sslray export` it by hand")
        return None
    log(f"sslray: backbone exported to {dest} and the MLflow run's backbone/ "
        f"(load: sslray.export.load_backbone({dest!r}))")
    return dest


BACKBONE_PREFIXES = ("backbone.", "encoder_q.", "base_encoder.")  # the online backbone in a whole model's keys


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """A backbone ``state_dict`` from an export folder, a ``.safetensors`` file, or a ``.pt``/``.pth``
    file holding a state_dict (timm's names; a ``state_dict``/``model`` entry, DDP's ``module.`` and a
    whole model's backbone prefix (``BACKBONE_PREFIXES``), as other tools save them, are unwrapped)."""
    import torch

    from .storage import fetch

    try:
        p = fetch(str(path))  # a URI (s3://...) is copied into the local cache first
    except FileNotFoundError:
        raise FileNotFoundError(f"model.init_weights: {path} not found") from None
    from .raytrain.evaluate import find_state, read_file
    from .raytrain.session import STATE_FILE

    if p.is_dir():
        try:  # an export folder, else a checkpoint or run folder of sslray's: its (newest) state.pt
            p = p / WEIGHTS if (p / WEIGHTS).exists() else find_state(p)
        except FileNotFoundError:
            p = p / WEIGHTS  # neither: named as the missing export below
        except ValueError as e:  # a folder of several runs' checkpoints
            raise ValueError(f"model.init_weights: {e}") from None
    if not p.exists():
        raise FileNotFoundError(f"model.init_weights: {p} not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        def load(f):
            return load_file(str(f))
    else:
        def load(f):
            # sslray's own checkpoint also holds RNG states (numpy arrays), which torch's weights-only
            # reader refuses; it is read as resume and `sslray export` read it. Any other file: weights only.
            return torch.load(f, map_location="cpu", weights_only=f.name != STATE_FILE)
    sd = read_file(p, load, "a weights file sslray can read", where="model.init_weights: ")
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"model.init_weights: {p} holds no state_dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel / DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    # A whole method's state_dict (sslray's own state.pt, solo-learn's and lightly's `backbone.`, MoCo's
    # official `encoder_q.` / `base_encoder.`): its online backbone is taken; heads, teachers and queues
    # stay behind.
    for prefix in BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return sd, p


def init_backbone(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """``model.init_weights``: load the weights into the method's backbone and, where the method has
    one, its EMA teacher's copy (which starts equal to the student). Classifier weights in the file
    (``fc.``, ``head.``, ``classifier.``: an ImageNet checkpoint) are dropped, since the backbone has
    none; anything else that does not match fails, naming the keys. Returns the modules' names."""
    sd, p = read_weights(path)
    target = model.backbone
    own = set(target.state_dict())
    dropped = [k for k in sd if k not in own and k.split(".")[0] in ("fc", "head", "classifier", "last_linear")]
    sd = {k: v for k, v in sd.items() if k not in dropped}
    missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in target.state_dict().items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
        raise ValueError(f"model.init_weights: {p} does not fit backbone {type(target).__name__} "
                         f"(model.backbone / model.cifar_stem / patch size): "
                         + "; ".join(f"{what}: {few(xs)}" for what, xs in
                                     (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if xs))
    loaded = ["backbone"]
    target.load_state_dict(sd, strict=True)
    teacher = teacher_backbone(model)
    if teacher is not None:
        teacher.load_state_dict(sd, strict=True)
        loaded.append("teacher backbone")
    return loaded


def cmd_export(a) -> int:
    out, dest = export_to(a.checkpoint, a.out, which="teacher" if a.teacher else "student", force=a.force)
    meta = json.loads((out / META).read_text())
    print(f"sslray export: {meta['method']} {meta['which']} backbone {meta['backbone']} (epoch {meta['epoch']}, "
          f"{meta['num_features']} features) -> {dest}/{WEIGHTS}, {dest}/{META}")
    print(f"  load it: from sslray.export import load_backbone; model, meta = load_backbone({dest!r})")
    return 0


def register(sub) -> None:
    e = sub.add_parser("export", help="a checkpoint's pretrained backbone -> safetensors + JSON for downstream use")
    e.add_argument("checkpoint", help="state.pt, a checkpoint folder, or a run folder (its newest checkpoint)")
    e.add_argument("out", help=f"folder to write {WEIGHTS} and {META} into (local, s3:// or gs://)")
    e.add_argument("--teacher", action="store_true",
                   help="the EMA teacher's backbone (BYOL, MoCo, DINO) instead of the student's")
    e.add_argument("--force", action="store_true", help="replace an earlier export in OUT")
    e.set_defaults(func=cmd_export)


def _timm_version() -> str:
    import timm

    return timm.__version__


__all__ = ["META", "WEIGHTS", "export_after_training", "export_backbone", "export_to", "init_backbone", "load_backbone",
           "read_weights", "rebuild_meta", "teacher_backbone", "write_export"]
