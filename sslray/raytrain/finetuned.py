"""A fine-tuned classifier on disk (``sslray eval --protocol finetune --ft-save DIR``).

``DIR`` is an ``sslray export`` folder, so ``sslray.export.load_backbone(DIR)`` reads the fine-tuned
backbone as it reads a pretrained one, with one file more beside it:

- ``backbone.safetensors`` + ``backbone.json``: the backbone, written by ``sslray.export.write_export``
  (its metadata says ``"which": "finetuned"`` and holds a ``finetune`` entry: the settings, the steps
  and the val scores of the run);
- ``head.safetensors``: the linear head (``weight``, ``bias``); ``backbone.json``'s ``head`` entry
  names the file, the class count and the class names in label order.

``load_classifier(DIR)`` rebuilds backbone + head as the ``Classifier`` that was trained. ``DIR`` may
be object storage (``s3://bucket/classifier``): the files are written locally, then uploaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

HEAD_WEIGHTS = "head.safetensors"


def check_save_dir(path: str | os.PathLike, option: str = "--ft-save (finetune.save)") -> str | Path:
    """``path`` as a folder the classifier may be written into: absent, or an empty folder (a URI: no
    object under it)."""
    from ..storage import filesystem, is_remote

    if is_remote(path):
        import pyarrow.fs as pafs

        uri = str(path).rstrip("/")
        fs, where = filesystem(uri)
        if fs.get_file_info(pafs.FileSelector(where, allow_not_found=True)):
            raise FileExistsError(f"{option}: {uri} already holds files; give a new or empty folder")
        return uri
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise FileExistsError(f"{option}: {p} exists and is not an empty folder; give a new or empty one")
    return p


def keep_saved(folder: Path, dest: str | os.PathLike) -> None:
    """The classifier ``save_classifier`` wrote into ``folder`` (a checkpoint's, or a temporary one) to
    ``dest``: a local folder, or object storage (uploaded file by file, ``backbone.json`` last)."""
    import shutil

    from ..export import META, WEIGHTS
    from ..storage import is_remote, join, upload

    out = check_save_dir(dest)
    if not is_remote(dest):
        shutil.copytree(folder, out, dirs_exist_ok=True)
        return
    for name in (HEAD_WEIGHTS, WEIGHTS, META):  # a reader that finds backbone.json finds the whole classifier
        upload(folder / name, join(str(out), name))


def save_classifier(net: nn.Module, cfg, classes: list[str], out: str | os.PathLike, *, checkpoint: str,
                    state: dict, info: dict) -> Path:
    """``net`` (a ``finetune.Classifier``) into ``out`` as described above. ``checkpoint``/``state``:
    the pretraining checkpoint it started from; ``info``: the run's settings and scores."""
    from safetensors.torch import save_file

    from .. import __version__
    from ..export import rebuild_meta, write_export

    out = check_save_dir(out)
    meta = {
        **rebuild_meta(net.backbone, cfg),
        "which": "finetuned",
        "method": cfg.method.name,
        "epoch": int(state.get("epoch", 0)),
        "step": int(state.get("step", 0)),
        "checkpoint": str(checkpoint),
        "versions": {"sslray": __version__, "torch": torch.__version__},
        "head": {"file": HEAD_WEIGHTS, "num_classes": int(net.head.out_features), "classes": list(classes)},
        "finetune": info,
    }
    out.mkdir(parents=True, exist_ok=True)
    head = {k: v.detach().cpu().contiguous() for k, v in net.head.state_dict().items()}
    # The head first: a reader that finds backbone.json finds the whole classifier.
    save_file(head, str(out / HEAD_WEIGHTS), metadata={"classes": json.dumps(list(classes))})
    write_export(out, net.backbone, meta)
    return out


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A ``--ft-save`` folder -> (``Classifier`` in eval mode, metadata). ``model(x)`` gives class logits
    for ``x`` normalised with ``meta["mean"]`` / ``meta["std"]`` at ``meta["input_size"]`` px; the
    class names are ``meta["head"]["classes"]``."""
    from safetensors.torch import load_file

    from ..export import load_backbone, local_export
    from .classifier import Classifier

    folder = local_export(path)  # a URI: copied into the local cache first
    backbone, meta = load_backbone(folder)
    head: Optional[dict] = meta.get("head")
    if not head or not (folder / head.get("file", HEAD_WEIGHTS)).exists():
        raise FileNotFoundError(f"load_classifier: {folder} holds a backbone but no classifier head "
                                f"({HEAD_WEIGHTS}; write one with `sslray eval --protocol finetune --ft-save DIR`)")
    net = Classifier(backbone, int(meta["num_features"]), int(head["num_classes"]))
    net.head.load_state_dict(load_file(str(folder / head["file"])), strict=True)
    return net.to(device).eval(), meta


__all__ = ["HEAD_WEIGHTS", "check_save_dir", "keep_saved", "load_classifier", "save_classifier"]
