"""The evaluation protocols, one registered function each: ``PROTOCOLS.get(name)(ctx) -> ProtocolResult``.

Every protocol scores the pretrained backbone and, beside it, the same backbone from a seeded random
init (left out with ``baseline=False``, ``--no-baseline``). The scikit-learn ones (linear, knn, lowshot,
embed) read the cached frozen features of ``ctx.store``; ``finetune`` trains the whole backbone with Ray
Train workers, and ``linear_sgd`` (the papers' linear evaluation) a linear head on the frozen backbone
with the same workers and loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from .. import storage
from ..raytrain.knn import knn_accuracy
from ..raytrain.probe import HoldoutError, choose_c, fit_linear_probe, linear_cs, linear_probe
from ..registry import Registry
from .features import INITS, FeatureStore
from .lowshot import fraction_label, stratified_indices

LABELS = {"pretrained": "pretrained", "random_init": "random init"}


@dataclass
class ProtocolResult:
    name: str
    pretrained: dict[str, float]
    random_init: dict[str, float]
    texts: dict[str, str] = field(default_factory=dict)  # artifact name -> text
    figures: dict[str, Any] = field(default_factory=dict)  # artifact name -> matplotlib figure
    info: dict[str, Any] = field(default_factory=dict)  # settings and sizes, logged as JSON

    def gain(self) -> dict[str, float]:
        """Pretrained minus random init, for every metric but spreads (``*_std``), counts (``*_runs``) and
        settings (``*_c``, a chosen C); empty without a baseline (``random_init`` empty)."""
        return {k: v - self.random_init[k] for k, v in self.pretrained.items()
                if k in self.random_init and not k.endswith(NO_GAIN)}


NO_GAIN = ("_std", "_runs", "_c")  # metric suffixes that no gain is taken of


@dataclass
class EvalContext:
    store: FeatureStore
    knn_ks: Sequence[int] = (10, 20, 100, 200)
    # one T or several, each scored with every k on the same features; None: the checkpoint's train.knn_temperature
    knn_temperature: Union[None, float, Sequence[float]] = None
    linear_c: Union[float, Sequence[float]] = (1.0,)  # several: chosen on held-out train features (fit_linear_probe)
    baseline: bool = True  # also score the seeded random-init backbone
    lowshot_fractions: Sequence[float] = (0.01, 0.1, 1.0)
    lowshot_seeds: Sequence[int] = (0, 1, 2)
    embed_points: int = 2000  # t-SNE cost grows with N; a stratified sample of the val split above this
    finetune: Any = None  # sslray.raytrain.finetune.FinetuneSettings
    # linear_sgd's FinetuneSettings (freeze_backbone); None: linear_sgd_settings(finetune), the paper protocol
    linear_sgd: Any = None
    log: Callable[[str], None] = print

    @property
    def inits(self) -> tuple[str, ...]:
        return INITS if self.baseline else INITS[:1]

    def temperatures(self) -> list[float]:
        t = self.knn_temperature
        if t is None:
            return [float(self.store.cfg.train.knn_temperature)]
        return list(dict.fromkeys(float(v) for v in ([t] if isinstance(t, (int, float)) else t)))


def check_settings(names: Sequence[str], knn_ks: Sequence[int] = EvalContext.knn_ks,
                   lowshot_fractions: Sequence[float] = EvalContext.lowshot_fractions,
                   lowshot_seeds: Sequence[int] = EvalContext.lowshot_seeds, knn_temperature=None,
                   linear_c=EvalContext.linear_c, finetune=None, linear_sgd=None, **_) -> None:
    """The ``EvalContext`` settings of the protocols that will run, checked before any feature is
    extracted (the option each comes from in the message: ``sslray eval`` flag / field)."""
    if "knn" in names and (not knn_ks or any(int(k) < 1 for k in knn_ks)):
        raise ValueError(f"--knn-k (knn_ks) needs neighbour counts of 1 or more, got {list(knn_ks)}")
    if "knn" in names and knn_temperature is not None:
        ts = [knn_temperature] if isinstance(knn_temperature, (int, float)) else list(knn_temperature)
        if not ts or not all(float(t) > 0 for t in ts):
            raise ValueError(f"--knn-temperature (knn_temperature) needs temperatures above 0, got {ts}")
    if {"linear", "lowshot"} & set(names):
        linear_cs(linear_c, "--linear-c (linear_c)")
    if "lowshot" in names:
        if not lowshot_fractions or any(not 0 < float(f) <= 1 for f in lowshot_fractions):
            raise ValueError(f"--lowshot-fractions (lowshot_fractions) needs label fractions in (0, 1], "
                             f"got {list(lowshot_fractions)}")
        if not lowshot_seeds:
            raise ValueError("--lowshot-seeds (lowshot_seeds) needs at least one seed")
    if finetune is not None and finetune.save:
        if "finetune" not in names:
            raise ValueError(f"--ft-save (finetune.save) keeps the finetune protocol's model; --protocol "
                             f"{','.join(names)} has no finetune")
        from ..raytrain.finetuned import check_save_dir

        check_save_dir(finetune.save)
    for name, s in (("finetune", finetune), ("linear_sgd", linear_sgd)):
        if name in names and s is not None:
            _check_training(name, s)


def _check_training(name: str, s) -> None:
    """A Ray-trained protocol's ``FinetuneSettings``, checked before its workers start."""
    from ..raytrain.finetune import OPTIMIZERS

    flag = "--lin" if s.freeze_backbone else "--ft"
    if s.optimizer not in OPTIMIZERS:
        raise ValueError(f"{name} optimizer {s.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    if not s.base_lr > 0:
        raise ValueError(f"{flag}-lr ({name} base_lr) must be above 0, got {s.base_lr}")
    if s.epochs < 1 or s.max_steps < 0:
        raise ValueError(f"{flag}-epochs / {flag}-max-steps ({name} epochs, max_steps) must be >= 1 / >= 0, "
                         f"got {s.epochs} / {s.max_steps}")
    if s.weight_decay < 0 or not 0 <= s.label_smoothing < 1 or not 0 <= s.drop_path < 1:
        raise ValueError(f"--ft-weight-decay >= 0, --ft-label-smoothing and --ft-drop-path in [0, 1) ({name} "
                         f"weight_decay, label_smoothing, drop_path), got {s.weight_decay}, {s.label_smoothing}, "
                         f"{s.drop_path}")


PROTOCOLS: Registry[Callable[[EvalContext], ProtocolResult]] = Registry("eval protocol")
register_protocol = PROTOCOLS.register


def parse_protocols(text: str | Sequence[str], option: str = "--protocol") -> list[str]:
    """``"linear,knn"`` (or a list) -> checked, de-duplicated names; an unknown one names the known ones."""
    items = text.split(",") if isinstance(text, str) else [p for t in text for p in str(t).split(",")]
    names = []
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in PROTOCOLS:
            raise ValueError(f"{option}: unknown eval protocol {name!r}; known: {', '.join(PROTOCOLS.names())}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"{option}: no protocol given; known: {', '.join(PROTOCOLS.names())}")
    return names


@register_protocol("linear")
def linear(ctx: EvalContext) -> ProtocolResult:
    """The scikit-learn logistic-regression probe on standardised frozen features."""
    out, texts, figs, info = {}, {}, {}, {}
    from .. import plots

    cs = linear_cs(ctx.linear_c)
    for init in ctx.inits:
        f = ctx.store.get(init)
        if ctx.store.fitted(init, cs):  # `sslray pretrain --eval linear`: the end-of-run probe fitted it
            ctx.log(f"eval linear: the {LABELS[init]} probe is the one fitted on these features after training")
        else:
            ctx.log(f"eval linear: fitting the {LABELS[init]} probe on {len(f.train_y)} images ...")
        res = ctx.store.linear(init, cs)
        out[init] = {f"linear_{k}": v for k, v in res.metrics.items()}
        if len(cs) > 1:  # one C is a fixed setting, as before; a chosen one is a result
            out[init]["linear_c"] = res.C
            info[f"linear_c_heldout_top1_{init}"] = {f"{c:g}": v for c, v in res.c_scores.items()}
        texts[f"linear/classification_report_{init}.txt"] = res.report
        figs[f"linear/confusion_{init}.png"] = plots.confusion(res.confusion, f.classes, f"linear probe ({LABELS[init]})")
        info[f"converged_{init}"] = res.converged
    info.update(train_images=int(len(f.train_y)), val_images=int(len(f.val_y)), linear_c=list(cs))
    return ProtocolResult("linear", out["pretrained"], out.get("random_init", {}), texts, figs, info)


@register_protocol("knn")
def knn(ctx: EvalContext) -> ProtocolResult:
    """Weighted kNN (Wu et al., 2018): cosine similarity, the top-k neighbours vote with exp(sim / T)."""
    ts = ctx.temperatures()
    out = {}
    for init in ctx.inits:
        f = ctx.store.get(init)
        bank, bank_y = torch.from_numpy(f.train_x), torch.from_numpy(f.train_y)
        q, qy = torch.from_numpy(f.val_x), torch.from_numpy(f.val_y)
        m = {}
        for t in ts:
            # one T keeps the names it always had; several name theirs
            tag = "" if len(ts) == 1 else f"_t{t:g}"
            for k in ctx.knn_ks:
                acc = knn_accuracy(q, qy, bank, bank_y, len(f.classes), int(k), t)
                m[f"knn_k{k}{tag}_top1"], m[f"knn_k{k}{tag}_top5"] = acc["knn_top1"], acc["knn_top5"]
        out[init] = m
    info = {"ks": list(map(int, ctx.knn_ks)), "temperature": ts[0] if len(ts) == 1 else ts,
            "bank_images": int(len(f.train_y)), "note": "k above the bank size uses the whole bank"}
    return ProtocolResult("knn", out["pretrained"], out.get("random_init", {}), info=info)


@register_protocol("lowshot")
def lowshot(ctx: EvalContext) -> ProtocolResult:
    """Linear probes on stratified, seeded subsets of the train labels; mean and std over the seeds.

    The 100% subset is the same for every seed and the lbfgs fit is deterministic, so it is fitted
    once (std 0) rather than repeated.

    Several Cs (``linear_c``): each subset's C is chosen as the linear protocol chooses it, on a held-out
    part of the subset; a subset with no class of 2 images (1 image per class) holds nothing out and
    takes the C chosen on a held-out part of all train features.
    """
    from tqdm.auto import tqdm

    cs = linear_cs(ctx.linear_c)
    out, info = {}, {"fractions": list(ctx.lowshot_fractions), "seeds": list(ctx.lowshot_seeds), "subsets": {}}
    if len(cs) > 1:
        info["linear_c"] = {}
    jobs = [(init, fr) for init in ctx.inits for fr in ctx.lowshot_fractions]
    bar = tqdm(total=sum(1 if fr >= 1 else len(ctx.lowshot_seeds) for _, fr in jobs), desc="low-shot probes",
               disable=not ctx.store.progress, leave=False)
    for init in ctx.inits:
        f = ctx.store.get(init)
        m, whole = {}, []  # whole: the C chosen on all train features, when a subset needs it

        def fit(idx, seed):
            try:
                return fit_linear_probe(f.train_x[idx], f.train_y[idx], f.val_x, f.val_y, f.classes, cs=cs, seed=seed)
            except HoldoutError:
                if not whole:
                    whole.append(choose_c(f.train_x, f.train_y, f.classes, cs, seed=ctx.store.cfg.train.seed)[0])
                return linear_probe(f.train_x[idx], f.train_y[idx], f.val_x, f.val_y, f.classes, C=whole[0], seed=seed)

        for fr in ctx.lowshot_fractions:
            seeds = list(ctx.lowshot_seeds)[:1] if fr >= 1 else list(ctx.lowshot_seeds)
            top1, f1 = [], []
            for seed in seeds:
                idx = stratified_indices(f.train_y, fr, seed)
                res = fit(idx, seed)
                if len(cs) > 1:
                    info["linear_c"][f"{init}_{fraction_label(fr)}_seed{seed}"] = res.C
                top1.append(res.metrics["top1"])
                f1.append(res.metrics["macro_f1"])
                info["subsets"][f"{fraction_label(fr)}_seed{seed}"] = int(len(idx))
                bar.update(1)
            lab = fraction_label(fr)
            m.update({f"lowshot_{lab}_top1_mean": float(np.mean(top1)), f"lowshot_{lab}_top1_std": float(np.std(top1)),
                      f"lowshot_{lab}_macro_f1_mean": float(np.mean(f1)),
                      f"lowshot_{lab}_macro_f1_std": float(np.std(f1)), f"lowshot_{lab}_runs": len(seeds)})
        out[init] = m
    bar.close()
    return ProtocolResult("lowshot", out["pretrained"], out.get("random_init", {}), info=info)


@register_protocol("embed")
def embed(ctx: EvalContext) -> ProtocolResult:
    """2-D t-SNE of the val features coloured by class (PNG), plus the cosine silhouette of the
    features themselves as a number that does not depend on the t-SNE run."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    from .. import plots

    seed = ctx.store.cfg.train.seed
    coords, out = {}, {}
    for init in ctx.inits:
        f = ctx.store.get(init)
        keep = np.arange(len(f.val_y))
        if len(keep) > ctx.embed_points:
            keep = stratified_indices(f.val_y, ctx.embed_points / len(keep), seed)
        x, y = f.val_x[keep], f.val_y[keep]
        ctx.log(f"eval embed: t-SNE of {len(y)} {LABELS[init]} val features ...")
        perplexity = float(min(30.0, max(2.0, (len(y) - 1) / 3)))
        coords[LABELS[init]] = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        out[init] = {"embed_silhouette": float(silhouette_score(x, y, metric="cosine"))}
    fig = plots.embedding(coords, y, f.classes, title="t-SNE of val features")
    return ProtocolResult("embed", out["pretrained"], out.get("random_init", {}), figures={"embed/tsne.png": fig},
                          info={"points": int(len(y)), "perplexity": perplexity})


@register_protocol("finetune")
def finetune(ctx: EvalContext) -> ProtocolResult:
    """Whole-backbone supervised fine-tuning on Ray Train workers, and the same budget from random init
    (without a baseline: the pretrained fit only)."""
    from ..raytrain.finetune import FinetuneSettings

    return _ray_trained(ctx, ctx.finetune or FinetuneSettings())


@register_protocol("linear_sgd")
def linear_sgd(ctx: EvalContext) -> ProtocolResult:
    """Linear evaluation as the papers run it (MoCo v3, MAE): a linear head trained with SGD (momentum
    0.9, no weight decay, cosine lr) on random-resized crops and flips through the frozen backbone,
    BatchNorm in eval mode; the fine-tune loop with ``freeze_backbone``. Not the scikit-learn
    ``linear`` probe, which fits standardised cached features."""
    from ..raytrain.finetune import FinetuneSettings, linear_sgd_settings

    s = ctx.linear_sgd or linear_sgd_settings(ctx.finetune or FinetuneSettings())
    if not s.freeze_backbone:
        raise ValueError("linear_sgd settings must freeze the backbone (freeze_backbone=True; see linear_sgd_settings)")
    return _ray_trained(ctx, s)


def _ray_trained(ctx: EvalContext, s) -> ProtocolResult:
    """``finetune`` or ``linear_sgd`` (``s.protocol``): one Ray Train fit per init."""
    from ..raytrain import finetune as ft

    st = ctx.store
    if st.state_path is None:  # run_eval refuses it before any work; a store handed in directly gets here
        raise ValueError(f"eval protocol {s.protocol} needs an sslray checkpoint (its method and config); "
                         f"{st.source.label} is a {st.source.kind} source")
    # A checkpoint fetched from s3:// or gs:// sits in this machine's cache only: workers on other nodes
    # get its URI and fetch it into their own.
    # Local paths absolute: the workers run in another working dir ("runs/<name>" found nothing there).
    state = storage.remote_source(st.state_path) or storage.absolute(str(st.state_path))
    train, val = storage.absolute(st.train), storage.absolute(st.val)
    if ctx.baseline:
        res = ft.finetune_compare(state, train, val, s, log=ctx.log)
    else:  # the scores and info of finetune_compare's pretrained fit, without its second full fit
        ctx.log(f"eval {s.protocol}: fitting the pretrained backbone on Ray Train (no random-init baseline) ...")
        m = ft.run_finetune(state, train, val, "pretrained", s)
        res = {"pretrained": ft.scores(m, s), "random_init": {}, "info": {"pretrained": ft.run_info(m)}}
    info = {"settings": s.__dict__, **res["info"]}
    if s.save:
        info["saved"] = storage.absolute(s.save)
    return ProtocolResult(s.protocol, res["pretrained"], res["random_init"], info=info)


# They train on the images themselves, through their own views: a feature store would go unused.
finetune.reads_features = linear_sgd.reads_features = False


def reads_features(name: str) -> bool:
    """Whether protocol ``name`` scores the frozen features of ``ctx.store`` (every one but ``finetune`` and
    ``linear_sgd``)."""
    return getattr(PROTOCOLS.get(name), "reads_features", True)
