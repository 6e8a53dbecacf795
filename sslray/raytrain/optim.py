"""Optimizers (SGD, LARS, AdamW) and per-iteration schedules (warmup-cosine lr and wd, cosine EMA)."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, lr: float = 0.0, no_decay_lr_scale: float = 1.0,
                 decay_bias_norm: bool = False) -> list[dict]:
    """Biases and norm parameters get no weight decay and no LARS adaptation (as in BYOL/Barlow Twins);
    ``decay_bias_norm`` decays them too (SimSiam's and MoCo's code decay every parameter), still
    without LARS adaptation. Parameters a method names in ``fixed_lr_parameters()`` (SimSiam's
    predictor) go to groups marked ``fixed_lr`` = ``lr``, which ``set_lr`` leaves at that value. Biases
    and norm parameters run at ``no_decay_lr_scale`` x the scheduled lr (Barlow Twins: 0.0048 / 0.2 = 0.024)."""
    fixed = {id(p) for p in getattr(model, "fixed_lr_parameters", lambda: [])()}
    buckets: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (not (p.ndim <= 1 or name.endswith(".bias")), id(p) in fixed)
        buckets.setdefault(key, []).append(p)
    groups = []
    for (weight, is_fixed), params in sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        decay = weight or decay_bias_norm
        g = {"params": params, "weight_decay": weight_decay if decay else 0.0, "lars": weight,
             "wd_scale": 1.0 if decay else 0.0, "lr_scale": 1.0 if weight else float(no_decay_lr_scale)}
        if is_fixed:
            g["fixed_lr"] = lr * g["lr_scale"]
        groups.append(g)
    return groups


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as used by SimCLR/BYOL: SGD with momentum where each weight tensor's
    step is scaled by ``eta * ||w|| / ||g + wd * w||``; groups with ``lars=False`` are plain SGD.

    ``clip=True`` is the variant most CIFAR reproductions tune their learning rates for (eta 0.02):
    the adapted lr ``eta * ||w|| / (||g|| + wd * ||w||)`` is capped at the scheduled lr, so a weight
    steps by ``min(adapted, lr) * (g + wd * w)`` (by ``lr * g`` where ``w`` or ``g`` is zero). Without
    the cap their lr and weight decay train the weights ~20x slower than they were tuned for.
    Hand-written because torch ships no LARS and the trust-ratio exclusions are method-specific."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001,
                 clip: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True,
                                      clip=clip))

    @torch.no_grad()
    def step(self, closure=None):
        # Whole groups at once with foreach ops: a per-tensor loop costs ~8 kernel launches per
        # parameter tensor (~500 per ResNet-18 step), which bounds small-batch GPU steps on the host.
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            if not ps:
                continue
            d = [p.grad for p in ps]
            wd = g["weight_decay"]
            if g.get("lars", True) and g.get("clip", False):
                pn, gn = torch.stack(torch._foreach_norm(ps)), torch.stack(torch._foreach_norm(d))
                ok = (pn > 0) & (gn > 0)
                adapted = g["eta"] * pn / (gn + wd * pn + 1e-8)
                # the cap as a fraction of the lr the final update multiplies by (1 while lr is 0)
                trust = torch.clamp(adapted / g["lr"], max=1.0) if g["lr"] > 0 else torch.ones_like(pn)
                # A zero weight or gradient: the plain gradient, not decayed (as the variant's reference)
                scaled = torch._foreach_mul(torch._foreach_add(d, ps, alpha=wd) if wd else d,
                                            list(torch.where(ok, trust, 0.0).unbind(0)))
                torch._foreach_add_(scaled, torch._foreach_mul(d, list((~ok).to(pn.dtype).unbind(0))))
                d = scaled
            elif g.get("lars", True):
                pn = torch.stack(torch._foreach_norm(ps))
                if wd:
                    d = torch._foreach_add(d, ps, alpha=wd)
                dn = torch.stack(torch._foreach_norm(d))
                trust = torch.where((pn > 0) & (dn > 0), g["eta"] * pn / dn, torch.ones_like(pn))
                d = torch._foreach_mul(d, list(trust.unbind(0)))
            elif wd:
                d = torch._foreach_add(d, ps, alpha=wd)
            fresh = [i for i, p in enumerate(ps) if "momentum_buffer" not in self.state[p]]
            for i in fresh:
                self.state[ps[i]]["momentum_buffer"] = d[i].clone()
            if len(fresh) < len(ps):
                old = set(range(len(ps))) - set(fresh)
                bufs = [self.state[ps[i]]["momentum_buffer"] for i in sorted(old)]
                torch._foreach_mul_(bufs, g["momentum"])
                torch._foreach_add_(bufs, [d[i] for i in sorted(old)])
            torch._foreach_add_(ps, [self.state[p]["momentum_buffer"] for p in ps], alpha=-g["lr"])
        return loss


OPTIMIZERS = ("sgd", "lars", "adamw")


def optimizer_from_config(model: nn.Module, cfg, lr: float):
    """The optimizer ``cfg.optim`` describes, at peak lr ``lr``."""
    o = cfg.optim
    return build_optimizer(model, o.name, lr, o.weight_decay, o.momentum, o.no_decay_lr_scale, o.lars_eta,
                           o.lars_clip, (o.adam_beta1, o.adam_beta2), o.decay_bias_norm)


def clip_gradients(parameters, max_norm: float, mode: str = "global") -> None:
    """``global``: one norm over every gradient (torch's ``clip_grad_norm_``); ``per_param``: each tensor
    scaled to at most ``max_norm`` on its own, as DINO's ``clip_gradients`` (a ViT has ~150 tensors, so a
    global clip at DINO's 3.0 would scale every tensor down far more often)."""
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        norms = torch.stack(torch._foreach_norm(grads))
        scale = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        torch._foreach_mul_(grads, list(scale.unbind(0)))


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    no_decay_lr_scale: float = 1.0, lars_eta: float = 0.001, lars_clip: bool = False,
                    betas: tuple[float, float] = (0.9, 0.999), decay_bias_norm: bool = False):
    groups = param_groups(model, weight_decay, lr, no_decay_lr_scale, decay_bias_norm)
    name = name.lower()
    if name == "sgd":
        opt = torch.optim.SGD([{k: v for k, v in g.items() if k != "lars"} for g in groups], lr=lr, momentum=momentum)
    elif name == "lars":
        opt = LARS(groups, lr=lr, momentum=momentum, eta=lars_eta, clip=lars_clip)
    elif name == "adamw":
        opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "lars"} for g in groups], lr=lr,
                                betas=tuple(betas))
    else:
        raise ValueError(f"config key 'optim.name': unknown optimizer {name!r} ({', '.join(OPTIMIZERS)})")
    if hasattr(model, "frozen_parameters"):
        skip_frozen(opt, model)
    return opt


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """A checkpoint's optimizer moments, under this run's group settings.

    ``load_state_dict`` also brings back every group's hyper-parameters as they were saved; those
    come from the config (SimSiam's ``fixed_lr`` at the run's peak lr, a constant weight decay,
    ``lr_scale``/``wd_scale``, momentum), so a run resumed at another batch size or with a changed
    optimizer setting keeps its own, not the old run's. Scheduled values (lr, scheduled decay) are set
    again before every step anyway."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for g, settings in zip(optimizer.param_groups, fresh):
        g.update(settings)


def skip_frozen(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Before every ``optimizer.step()``, drop the gradients of the parameters ``model.frozen_parameters()``
    names for this step (DINO's last layer in epoch 1, SwAV's prototypes in the first iterations).

    A zero gradient is not enough: decoupled weight decay (AdamW), SGD's and LARS's ``wd * w`` term and
    momentum from earlier steps would still move them. With ``grad = None`` every optimizer here skips
    the parameter entirely, as DINO's ``cancel_gradients_last_layer`` does. The methods still give
    these parameters an exactly-zero gradient in backward, so DDP's reducer sees them used.
    """

    def hook(opt, args, kwargs):
        for p in model.frozen_parameters():
            p.grad = None

    optimizer.register_step_pre_hook(hook)


def warmup_cosine(step: int, total: int, warmup: int, peak: float, floor: float = 0.0) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then cosine to ``floor``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def cosine_momentum(step: int, total: int, base: float, end: float = 1.0) -> float:
    """EMA momentum from ``base`` at step 0 to ``end`` at step ``total`` along a cosine: BYOL's
    ``1 - (1 - base) (cos(pi k / K) + 1) / 2`` (sec. 3.2) with 1 replaced by ``end`` (1 in BYOL, MoCo v3
    and DINO; below 1 the teacher still follows the student in a short run's last steps). The loop
    applies steps 0 .. total - 1, so the last update uses a value just short of ``end``."""
    return end - (end - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


def weight_decay_at(step: int, total: int, start: float, end: float) -> float:
    """Per-iteration weight decay: ``start`` held when ``end`` < 0, else a cosine from ``start`` to
    ``end`` (DINO's 0.04 -> 0.4), the same curve as the lr's without warm-up."""
    return start if end < 0 else warmup_cosine(step, total, 0, start, end)


def set_weight_decay(optimizer: torch.optim.Optimizer, wd: float) -> None:
    """Every group's decay is ``wd`` times its ``wd_scale`` (0 for biases and norm parameters)."""
    for g in optimizer.param_groups:
        g["weight_decay"] = wd * g.get("wd_scale", 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr for every group, except groups marked ``fixed_lr`` (they keep theirs)."""
    for g in optimizer.param_groups:
        g["lr"] = g["fixed_lr"] if "fixed_lr" in g else lr * g.get("lr_scale", 1.0)
