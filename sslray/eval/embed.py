"""`sslray embed`: one split's frozen embeddings written as .npz, for use outside sslray.

The embeddings are the features the eval protocols score (``features.extract_split``: the same
decode size, eval transform and precision), of any source ``--checkpoint`` names (an sslray
checkpoint, an export folder, ``timm:<name>`` with ``--weights``). The .npz holds

- ``embeddings``: float32, N x D, in the data's own order (a .beton's index order, an ImageFolder's
  sorted class folders and file names);
- ``labels`` (int64) and ``classes`` when the data has class labels;
- ``paths``: each image's source file when known (an ImageFolder tree's files; for a .beton, the
  ``<name>.paths.txt`` that ``sslray convert`` writes beside it, one source path per row);
- ``meta``: JSON of the source, data, eval transform, device and precision.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

def source_names(data: str, num_images: int) -> Optional[list[str]]:
    """Each image's source file, in the loader's index order, when the data says; None otherwise. A
    .beton's come from the list ``sslray convert`` writes beside it (``convert.paths_path``), joined to
    the source folder it names them under; a list of another conversion is refused, naming both files."""
    from ..datasets.convert import ConversionError, read_manifest, source_paths
    from ..datasets.loader import DataError

    if os.path.isdir(data):
        from ..datasets.loader import _image_folder  # the listing the torchvision loader reads, in its order

        return [s[0] for s in _image_folder(data, 0).samples]
    try:
        names = source_paths(data)
    except ConversionError as e:
        raise DataError(f"{e} (or remove the list to embed without file names)") from None
    if names is None:
        return None
    if len(names) != num_images:  # a .beton without its manifest: source_paths could not compare them
        raise DataError(f"the source-path list beside {data} names {len(names)} files but it holds {num_images} "
                        "images: it is of another conversion (convert again, or remove it)")
    root = (read_manifest(data) or {}).get("paths_root")
    return [n if not root or os.path.isabs(n) else str(Path(root, n)) for n in names]


def _with_head(source):
    """The backbone followed by the method's projector (or head): an sslray checkpoint's only."""
    from torch import nn

    from ..raytrain.monitors import HEAD_NAMES

    if source.kind != "checkpoint":
        raise ValueError(f"--head: {source.label} is an sslray {source.kind} source, a backbone without the "
                         "method's projector; --head needs an sslray checkpoint")
    model = source.method()
    head = next((m for m in (getattr(model, n, None) for n in HEAD_NAMES) if isinstance(m, nn.Module)), None)
    if head is None:
        raise ValueError(f"--head: method {source.cfg.method.name!r} has no projector or head "
                         f"({' / '.join(HEAD_NAMES)}) to embed with; leave --head out for the backbone's features")
    return nn.Sequential(model.backbone, head)


def embed_data(checkpoint: str, data: str, *, source=None, head: bool = False, batch_size: int = 256,
               use_gpu: str = "auto", progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """The arrays ``sslray embed`` writes (see the module docstring) for ``data`` (a .beton or an
    ImageFolder tree); ``source``: ``SourceOptions`` (``--weights``, the eval transform)."""
    import numpy as np

    from ..datasets.loader import dataset_info
    from ..datasets.views import normalisation
    from ..raytrain.amp import resolve_precision
    from ..raytrain.session import pick_device
    from .features import extract_split
    from .source import resolve_source

    info = dataset_info(data)  # DataError naming a file that is not there or no dataset
    enc = resolve_source(checkpoint, source, data=(data,))
    names = source_names(data, info.num_images)  # a stale sidecar fails before the backbone runs
    device = pick_device(0, use_gpu)
    log(enc.describe().replace("eval:", "embed:", 1))
    model = _with_head(enc) if head else enc.backbone("pretrained")
    x, y = extract_split(model.to(device), data, enc.cfg, device, batch_size, None, "embed", progress)
    mean, std = normalisation(enc.cfg.views)
    meta = {"source": enc.label, "kind": enc.kind, "data": str(Path(data).resolve()), "head": head,
            "crop_size": enc.cfg.views.crop_size, "mean": list(mean), "std": list(std),
            "decode_res": enc.cfg.data.decode_res, "device": device.type,
            "precision": resolve_precision(enc.cfg.train.precision, device), "num_images": int(len(x)),
            "dim": int(x.shape[1])}
    out = {"embeddings": x}
    if info.classes:
        out.update(labels=y, classes=np.array(info.classes))
    if names is not None:
        out["paths"] = np.array(names)
    out["meta"] = np.array(json.dumps(meta))
    return out


def check_out(out: str, force: bool = False) -> Path:
    """``--out`` as a path: a .npz file name, not there yet unless ``force``."""
    p = Path(out)
    if p.suffix != ".npz":
        raise ValueError(f"--out {out}: give a .npz file name")
    if p.is_dir():
        raise FileExistsError(f"--out {out} is a folder; give a .npz file name")
    if p.exists() and not force:
        raise FileExistsError(f"--out {out} already exists; pass --force to replace it")
    return p


def write_npz(arrays: dict, out: str, force: bool = False) -> Path:
    """``arrays`` as ``out`` (a .npz), never half-written; an existing file only with ``force``."""
    import numpy as np

    p = check_out(out, force)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to the temporary name
            np.savez(f, **arrays)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def cmd_embed(a) -> int:
    from ..cli import _abs
    from .cli import source_options

    opts = source_options(a)
    check_out(a.out, a.force)  # before the backbone runs over the data
    arrays = embed_data(a.checkpoint, _abs(a.data), source=opts, head=a.head, batch_size=a.batch_size, use_gpu=a.gpu)
    path = write_npz(arrays, a.out, force=a.force)
    n, d = arrays["embeddings"].shape
    has = [k for k in ("labels", "paths") if k in arrays]
    print(f"sslray embed: {n} x {d} embeddings of {a.data}{' with ' + ', '.join(has) if has else ''} -> {path}")
    return 0


def register(sub) -> None:
    from ..cli import count
    from .cli import add_source_args

    e = sub.add_parser("embed", help="one split's frozen embeddings (and labels, file names) as .npz")
    add_source_args(e)
    e.add_argument("--data", required=True, help=".beton (file names from the paths list `sslray convert` writes "
                                                 "beside it) or an ImageFolder tree")
    e.add_argument("--out", required=True, help="the .npz to write: embeddings, labels, classes, paths, meta")
    e.add_argument("--head", action="store_true",
                   help="the method's projector output instead of the backbone's (an sslray checkpoint's only)")
    e.add_argument("--batch-size", type=count(1), default=256)
    e.add_argument("--gpu", default="auto", choices=["auto", "true", "false"])
    e.add_argument("--force", action="store_true", help="replace an existing --out")
    e.set_defaults(func=cmd_embed)
