"""`sslray views`: what a method's augmentations do to your images, before you train on them.

Images spread over a .beton beside the views the method's recipe makes of them, drawn by the same
device-side code as training (``sslray.datasets.views.build_views``). Every run logs the same
picture (``pictures/views.png``) from its first training batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def draw_views(data: str, method: str, out: str, recipe: str | None = None, n: int = 8, seed: int = 0,
               overrides=(), device: str = "cpu") -> Path:
    import torch

    from . import plots
    from .datasets.loader import dataset_info, make_loader, spread_indices
    from .datasets.views import build_views
    from .raytrain.methods import recipe_config
    from .raytrain.pictures import first_images, views_figure

    if not Path(data).exists():
        raise FileNotFoundError(f"--data {data}: no such .beton")
    cfg = recipe_config(method, recipe, overrides)
    dev = torch.device(device)
    if n < 1:
        raise ValueError(f"-n {n}: draw at least one image")
    total = dataset_info(data).num_images  # also a clear error for a file that is not a .beton
    if total < 1:
        raise ValueError(f"--data {data}: no images to draw")
    idx = spread_indices(total, n, seed)
    x = first_images(make_loader(data, len(idx), res=cfg.data.decode_res, device=dev, train=False, indices=idx,
                                 num_workers=1), len(idx))
    torch.manual_seed(seed)
    mv = build_views(cfg.views).to(dev)
    fig = views_figure(x, mv(x), mv, n, f"{method}: {Path(data).name} and its views ({cfg.views.preset} preset)")
    out_p = Path(out)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    out_p.write_bytes(plots.png_bytes(fig))
    return out_p


def cmd_views(a) -> int:
    p = draw_views(a.data, a.method, a.out or f"views-{a.method}.png", a.recipe, a.num, a.seed, a.overrides)
    print(f"sslray views: wrote {p}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("views", help="a grid of source images beside a method's augmented views (PNG)")
    v.add_argument("--data", required=True, help=".beton to draw images from (spread over the whole file, "
                                                         "so a class-sorted dataset shows several classes)")
    v.add_argument("--method", required=True, help="SSL method whose views to draw (see `sslray methods`)")
    v.add_argument("--recipe", help="recipe for the views (default: the method's <method>_cifar10 recipe)")
    v.add_argument("--out", help="output PNG (default views-<method>.png)")
    v.add_argument("-n", "--num", type=int, default=8, help="source images (rows)")
    v.add_argument("--seed", type=int, default=0, help="seed for the sample of images and the augmentation parameters")
    v.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. views.min_scale=0.2")
    v.set_defaults(func=cmd_views)
