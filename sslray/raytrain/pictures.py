"""The pictures a run draws, on rank 0 only: what the model saw, how its schedules run, what MAE
reconstructs, which training images its features call neighbours. Each is a PNG handed to
``session.save_picture``; the driver logs it to the MLflow run (see trainer.py). Drawing lives in
``sslray.plots``; this module only gathers the tensors. ``plots`` (matplotlib, ~0.6 s) is imported
where a picture is drawn, so the other ranks never load it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .amp import autocast_for
from .optim import warmup_cosine, weight_decay_at

VIEWS_PNG = "views.png"
SCHEDULES_PNG = "schedules.png"
RETRIEVAL_PNG = "retrieval.png"
THUMB = 64  # px: retrieval keeps the bank's images at most this large
MAX_BANK = 20000  # images: retrieval's bank, a spread sample of the train split when that holds more


def mae_png(epoch: int) -> str:
    return f"mae_reconstruction_epoch_{epoch:04d}.png"


def view_params(multiview) -> list:
    """The ``AugParams`` of every view a ``MultiView`` returns, in order (for un-normalising)."""
    return [aug.params for aug, count in zip(multiview.augs, multiview.counts) for _ in range(count)]


def views_figure(x: torch.Tensor, views: list[torch.Tensor], multiview, n: int = 8, title: str = ""):
    """One row per source image: the decoded image, then each of the method's views of it."""
    from .. import plots
    params = view_params(multiview)
    n = min(n, x.shape[0])
    src = plots.to_images(x[:n])
    cols = [plots.to_images(v[:n], p.mean, p.std) for v, p in zip(views, params)]
    rows = [[src[i]] + [c[i] for c in cols] for i in range(n)]
    names = ["source"] + [f"view {j + 1} ({v.shape[-1]}px)" for j, v in enumerate(views)]
    return plots.image_grid(rows, names, title=title)


def schedule_series(cfg, model, total: int, warmup: int, peak: float, points: int = 1000) -> tuple[np.ndarray, dict]:
    """lr, weight decay and (for methods with a momentum teacher) EMA momentum at up to ``points`` steps."""
    from .methods._ema import ema_momentum

    steps = np.unique(np.linspace(0, max(0, total - 1), min(max(1, total), points)).astype(int))
    floor = peak * cfg.optim.min_lr_ratio
    series = {"lr": [warmup_cosine(int(s), total, warmup, peak, floor) for s in steps],
              "weight_decay": [weight_decay_at(int(s), total, cfg.optim.weight_decay, cfg.optim.weight_decay_end)
                               for s in steps]}
    base = getattr(model, "base_momentum", None)
    if isinstance(base, float):
        sched, end = getattr(model, "momentum_schedule", "cosine"), getattr(model, "momentum_end", 1.0)
        series["ema_momentum"] = [ema_momentum(int(s), total, base, sched, end) for s in steps]
    return steps, series


def first_images(loader, n: int) -> torch.Tensor:
    """The first ``n`` uint8 images of a sequential (eval) loader, copied out of its buffers."""
    got = []
    for x, _ in loader:
        got.append(x[: n - sum(len(g) for g in got)].clone())
        if sum(len(g) for g in got) >= n:
            break
    if not got:
        raise ValueError("no images to draw")
    return torch.cat(got)


@torch.no_grad()
def mae_figure(model, imgs: torch.Tensor, evalT, epoch: int, seed: int = 0):
    """Original, masked input and reconstruction for fixed images (fixed mask via a seeded generator)."""
    from .. import plots
    was = model.training
    model.eval()
    try:
        x = evalT(imgs)
        g = torch.Generator(device=x.device).manual_seed(seed)
        masked, recon = model.reconstruct(x, generator=g)
    finally:
        model.train(was)
    mean, std = evalT.mean.flatten().tolist(), evalT.std.flatten().tolist()
    cols = [plots.to_images(t, mean, std) for t in (x, masked, recon)]
    rows = [[c[i] for c in cols] for i in range(x.shape[0])]
    return plots.image_grid(rows, ["original", "masked input", "reconstruction"],
                            title=f"MAE reconstructions, epoch {epoch}")


@torch.no_grad()
def retrieval_figure(backbone, bank, queries: torch.Tensor, evalT, device, precision: str = "auto", k: int = 8,
                     max_bank: int = MAX_BANK, title: str = "kNN retrieval"):
    """For each query (uint8), its top-``k`` cosine neighbours among the first ``max_bank`` images of
    the ``bank`` loader (sequential train images), features from the frozen ``backbone``. Callers hand
    it a loader over a spread sample (``spread_subset``): the first images of a class-sorted split
    would offer neighbours from a few classes only."""
    from .. import plots
    was = backbone.training
    backbone.eval()
    feats, thumbs = [], []
    try:
        q = backbone(evalT(queries.to(device))).float()
        seen = 0
        for x, _ in bank:
            x = x[: max_bank - seen].to(device)
            with autocast_for(device, precision):
                feats.append(backbone(evalT(x)).float())
            small = x if x.shape[-1] <= THUMB else F.interpolate(x.float(), size=(THUMB, THUMB), mode="area").byte()
            thumbs.append(small.cpu())
            seen += x.shape[0]
            if seen >= max_bank:
                break
    finally:
        backbone.train(was)
    if not feats:
        raise ValueError("retrieval: the bank loader gave no images")
    bank_f, thumbs_t = torch.cat(feats), torch.cat(thumbs)
    sim = F.normalize(q, dim=1) @ F.normalize(bank_f, dim=1).t()
    top = sim.topk(min(k, bank_f.shape[0]), dim=1)
    qs = plots.to_images(queries)
    rows = [[qs[i]] + plots.to_images(thumbs_t[top.indices[i].cpu()]) for i in range(len(qs))]
    names = ["query"] + [f"#{j + 1}" for j in range(top.indices.shape[1])]
    k = top.indices.shape[1]
    return plots.image_grid(rows, names, title=f"{title} (top-{k} of {bank_f.shape[0]} train images)")


class RunPictures:
    """Rank 0's pictures during training. Drawing never stops a run: a failure is logged and skipped."""

    def __init__(self, cfg, session, model, data, multiview, evalT):
        self.cfg, self.session, self.model, self.data = cfg, session, model, data
        self.multiview, self.evalT = multiview, evalT
        # Sessions without a place for pictures (Tune trials, benchmark sessions) draw nothing.
        self.on = (bool(cfg.monitor.pictures) and session.rank == 0 and hasattr(session, "save_picture")
                   and getattr(session, "keeps_pictures", True))
        self.n = max(1, cfg.monitor.num_images)
        self._fixed = None

    def _save(self, name: str, make) -> None:
        try:
            from .. import plots

            self.session.save_picture(name, plots.png_bytes(make()))
        except Exception as e:  # noqa: BLE001 - a picture is never worth a failed run
            self.session.log(f"pictures: {name} skipped ({type(e).__name__}: {e})")

    def _loader(self, path: str, indices: np.ndarray, batch_size: int):
        """A sequential loader over ``indices`` of ``path``, of the kind the run trains with (a resident
        run's shares the process's in-memory copy, so nothing is decoded again)."""
        from ..datasets.loader import make_loader
        from ..datasets.resident import make_resident_loader

        d = self.cfg.data
        load = make_resident_loader if d.resident else make_loader
        return load(path, max(1, batch_size), res=d.decode_res, device=self.session.device, train=False,
                    indices=indices, num_workers=d.loader_workers, os_cache=d.os_cache, batches_ahead=d.batches_ahead)

    def fixed_images(self, fallback: torch.Tensor | None = None) -> torch.Tensor:
        """``num_images`` val images spread over the whole val split, seeded by ``train.seed`` (the same
        images every epoch and after a resume), else the given batch. Rank 0's val loader holds only its
        slice of a class-sorted split: its first images would all share one class."""
        if self._fixed is None:
            from ..datasets.loader import spread_subset

            split = getattr(self.data, "val_split", None)
            if split is not None:
                path, idx, total = split
                pick = spread_subset(idx, total, self.n, self.cfg.train.seed)
                self._fixed = first_images(self._loader(path, pick, len(pick)), len(pick))
            elif self.data.val is not None:  # loaders built without their split (benchmarks): what they hold
                self._fixed = first_images(self.data.val, self.n)
            else:
                self._fixed = fallback[: self.n].clone()
        return self._fixed

    def bank(self):
        """Retrieval's bank: a spread sample of the whole kNN bank (seeded by ``train.seed``), as many
        images as rank 0's slice of it holds (at most ``MAX_BANK``), so the grid decodes no more than
        it did from that slice while its neighbours can come from every class."""
        from ..datasets.loader import spread_subset

        split = getattr(self.data, "bank_split", None)
        if split is None:  # loaders built without their split (benchmarks): rank 0's bank as it is
            return self.data.bank
        path, idx, total = split
        shard = -(-(total if idx is None else len(idx)) // max(1, getattr(self.session, "world_size", 1)))
        pick = spread_subset(idx, total, min(MAX_BANK, shard), self.cfg.train.seed)
        return self._loader(path, pick, getattr(self.data.bank, "batch_size", 256))

    def at_start(self, x: torch.Tensor, views: list[torch.Tensor], total: int, warmup: int, peak: float) -> None:
        """First step of a fresh run: the batch and the very views the model is trained on, and the schedules."""
        if not self.on:
            return
        name = f"{self.cfg.method.name}: source and views ({self.cfg.views.preset} preset)"
        self._save(VIEWS_PNG, lambda: views_figure(x, views, self.multiview, self.n, name))

        def sched():
            from .. import plots
            steps, series = schedule_series(self.cfg, self.model, total, warmup, peak)
            return plots.schedules(series, f"{self.cfg.method.name}: schedules over {total} steps", xs=steps)

        self._save(SCHEDULES_PNG, sched)
        self._first_batch = x[: self.n].clone()

    def after_epoch(self, epoch: int, last: bool) -> None:
        """MAE reconstructions every ``monitor.recon_every`` epochs (and the last); retrieval at the end."""
        if not self.on:
            return
        fallback = getattr(self, "_first_batch", None)
        every = max(1, self.cfg.monitor.recon_every)
        if hasattr(self.model, "reconstruct") and (epoch % every == 0 or last):
            self._save(mae_png(epoch), lambda: mae_figure(self.model, self.fixed_images(fallback), self.evalT, epoch,
                                                          self.cfg.train.seed))
        if last and self.data.bank is not None:
            dev = self.session.device
            self._save(RETRIEVAL_PNG, lambda: retrieval_figure(
                self.model.backbone, self.bank(), self.fixed_images(fallback), self.evalT, dev,
                self.cfg.train.precision, title=f"{self.cfg.method.name} kNN retrieval after epoch {epoch}"))
