"""Health signals of a training run, computed inside the loop without a host sync per step.

* Collapse monitors on the backbone features and the projector outputs of one training step per
  epoch (the epoch's last): the per-dimension std of the L2-normalised embeddings relative to
  1/sqrt(d) (SimSiam, Chen & He 2021, sec. 4.1: ~1 when healthy, 0 when collapsed), the effective
  rank (RankMe, Garrido et al. 2023: exp of the entropy of the normalised singular values) and the
  mean pairwise cosine similarity within the batch.
* ``StepHealth``: gradient norms of the backbone and of everything else (the heads), the count of
  steps skipped for a non-finite loss or gradient, and the stop after too many in a row. Every
  per-step quantity stays on the device; the host looks at it every ``check_every`` steps (every
  step on CPU, where a "sync" costs nothing) and before every checkpoint.

The embeddings are captured by forward hooks on the method's head (its input is the backbone's
pooled feature, its output the projection), so no method has to return them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# A monitor trips when any of these holds. Healthy runs sit far from each limit: the std ratio is
# ~1 for projector outputs and ~0.3-0.6 for post-ReLU backbone features, RankMe is in the tens,
# the mean cosine of a BN-ed projection is ~0 (ReLU features ~0.5-0.9 at random init).
STD_RATIO_MIN = 0.05  # std * sqrt(d) of the normalised embeddings
RANK_MIN = 2.0  # RankMe below this: the batch spans (about) one direction
MEAN_COS_MAX = 0.98  # all embeddings point the same way
TAP_KEYS = ("feats", "z")  # what EmbeddingTap captures: backbone features, projector outputs
COLLAPSE_STATS = ("std_ratio", "rankme", "mean_cos")  # collapse_stats' keys; metrics "<tap key>_<stat>"
HEAD_NAMES = ("projector", "head")  # the module whose input/output are the features/projections
# fp16 loss scaling halves its scale at every overflowing step, from 2**16: after this many in a row
# the scale is ~2**-14 and gradients that are still non-finite are not an overflow but a fault.
OVERFLOW_STREAK_MAX = 30


class NonFiniteLossError(FloatingPointError):
    """Raised on a NaN/inf loss; the message names the method, the step and the last finite values."""


@torch.no_grad()
def collapse_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``std_ratio``, ``rankme`` and ``mean_cos`` of a batch of embeddings ``(n, d)``, as 0-d device tensors."""
    x = x.detach().float().flatten(1)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"collapse_stats needs at least 2 embeddings, got {n}")
    u = F.normalize(x, dim=1)
    std_ratio = u.std(0).mean() * math.sqrt(d)
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(1e-12) + 1e-7
    rankme = torch.exp(-(p * p.log()).sum())
    mean_cos = (u.sum(0).square().sum() - n) / (n * (n - 1))  # mean of the off-diagonal u_i . u_j
    return {"std_ratio": std_ratio, "rankme": rankme, "mean_cos": mean_cos}


def tripped(stats: dict[str, float]) -> list[str]:
    """The reasons a set of (host) stats counts as collapsed; empty when healthy."""
    out = []
    if stats["std_ratio"] < STD_RATIO_MIN:
        out.append(f"std x sqrt(d) {stats['std_ratio']:.3g} < {STD_RATIO_MIN}")
    if stats["rankme"] < RANK_MIN:
        out.append(f"RankMe {stats['rankme']:.3g} < {RANK_MIN}")
    if stats["mean_cos"] > MEAN_COS_MAX:
        out.append(f"mean cosine {stats['mean_cos']:.3g} > {MEAN_COS_MAX}")
    return out


class EmbeddingTap:
    """Forward hooks that keep the first backbone features (``feats``) and projections (``z``) seen
    while armed. The head is the method's ``projector`` (or ``head``); methods without one (MAE)
    give the class token of the backbone's final norm as ``feats``."""

    def __init__(self, model: nn.Module):
        self.armed = False
        self.captured: dict[str, torch.Tensor] = {}
        self._handles = []
        head = next((m for m in (getattr(model, n, None) for n in HEAD_NAMES) if isinstance(m, nn.Module)), None)
        backbone = getattr(model, "backbone", None)
        self.from_head = head is not None  # feats = the projector's input, i.e. the backbone's pooled output
        if head is not None:
            self._handles.append(head.register_forward_hook(self._on_head))
        elif backbone is not None:
            target = getattr(backbone, "norm", None)
            target = target if isinstance(target, nn.Module) and not isinstance(target, nn.Identity) else backbone
            self._handles.append(target.register_forward_hook(self._on_backbone))

    def _keep(self, key: str, t) -> None:
        if self.armed and key not in self.captured and isinstance(t, torch.Tensor):
            t = t.detach()
            self.captured[key] = t[:, 0] if t.ndim == 3 else t.flatten(1)

    def _on_head(self, module, inputs, output) -> None:
        self._keep("feats", inputs[0] if inputs else None)
        self._keep("z", output)

    def _on_backbone(self, module, inputs, output) -> None:
        self._keep("feats", output)

    def take(self) -> dict[str, torch.Tensor]:
        out, self.captured, self.armed = self.captured, {}, False
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def collapse_metrics(captured: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"feats_std_ratio": t, "z_rankme": t, ...}`` for whatever the tap captured (device tensors)."""
    out = {}
    for key, x in captured.items():
        if x.shape[0] >= 2:
            out.update({f"{key}_{k}": v for k, v in collapse_stats(x).items()})
    return out


def collapse_report(metrics: dict[str, float]) -> tuple[dict[str, float], list[str]]:
    """Flags ``collapse_feats`` / ``collapse_z`` (1.0 tripped, 0.0 not) and one warning line per trip."""
    flags, lines = {}, []
    for key in TAP_KEYS:
        names = {k: metrics.get(f"{key}_{k}") for k in COLLAPSE_STATS}
        if any(v is None for v in names.values()):
            continue
        why = tripped(names)
        flags[f"collapse_{key}"] = float(bool(why))
        if why:
            what = "backbone features" if key == "feats" else "projector outputs"
            lines.append(f"collapse warning: {what}: {'; '.join(why)}")
    return flags, lines


class StepHealth:
    """Per-step gradient norms and non-finite bookkeeping, all on the device.

    ``after_backward(loss, step)`` returns a 0-d bool ``ok`` tensor. With ``max_skips`` > 0 a
    non-finite step becomes a no-op for the model: its gradients are zeroed and its parameters
    restored after the optimizer step (``restore``); optimizer moments still decay by one step. The
    floating-point buffers its forward wrote (BN running statistics, queues, DINO's centre), kept by
    ``before_forward``, are put back too: a NaN forward would otherwise leave NaN running statistics
    that train-mode BN never reads but every eval-mode use (kNN, probe, export) does.
    ``check(...)`` (host) raises ``NonFiniteLossError`` once more than ``max_skips`` steps in a row
    were non-finite; with ``max_skips`` = 0 the first one stops the run.

    With ``loss_scaling`` (fp16) a finite loss with non-finite gradients is the loss scaler's
    overflow: the scaler skips that update and halves its scale, so the step is counted apart
    (``amp_overflow_frac``) and is no fault, unless it repeats more than ``OVERFLOW_STREAK_MAX``
    times in a row. The gradients must be unscaled before ``after_backward``.
    """

    def __init__(self, model: nn.Module, device: torch.device, max_skips: int = 0, check_every: int = 1,
                 loss_scaling: bool = False):
        backbone = getattr(model, "backbone", None)
        bb_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
        params = [p for p in model.parameters() if p.requires_grad]
        self.backbone_params = [p for p in params if id(p) in bb_ids]
        self.head_params = [p for p in params if id(p) not in bb_ids]
        self.params = params
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.device, self.max_skips, self.check_every = device, int(max_skips), max(1, int(check_every))
        self.loss_scaling = bool(loss_scaling)
        z = lambda v=0.0: torch.tensor(v, device=device)  # noqa: E731
        self.streak, self.trip_step, self.trip_loss, self.streak_loss = z(), z(-1.0), z(), z()
        self.overflow_streak = z()
        self.last_finite_loss, self.last_finite_step = z(float("nan")), z(-1.0)
        self.reset_epoch()
        self._backup: Optional[list[torch.Tensor]] = None
        self._buffer_backup: Optional[list[torch.Tensor]] = None
        self._lrs: dict[int, float] = {}

    def reset_epoch(self) -> None:
        z = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self.sums = {"grad_norm_backbone": z(), "grad_norm_heads": z()}
        self.ok_steps, self.skipped = z(), z()  # steps whose loss counts / steps that were a fault
        self.norm_steps, self.overflows = z(), z()  # steps with finite gradients / fp16 overflows

    EPOCH_KEYS = ("grad_norm_backbone", "grad_norm_heads", "norm_steps", "skipped", "overflows")

    def _epoch_tensors(self) -> list[torch.Tensor]:
        return [self.sums["grad_norm_backbone"], self.sums["grad_norm_heads"], self.norm_steps, self.skipped,
                self.overflows]

    def epoch_state(self) -> dict[str, float]:
        """This epoch's sums so far, averaged over ranks (a collective: every rank calls it), for a
        mid-epoch checkpoint: a resumed epoch's grad norms and skipped/overflow fractions then cover
        the whole epoch, as an uninterrupted run's do."""
        from . import distributed as D

        vals = D.all_reduce_mean(torch.stack([t.float() for t in self._epoch_tensors()])).tolist()
        return dict(zip(self.EPOCH_KEYS, vals))

    def resume_epoch(self, saved: Optional[dict]) -> None:
        """Start the epoch's sums from a mid-epoch checkpoint's ``epoch_state()`` (none in older ones)."""
        for t, k in zip(self._epoch_tensors(), self.EPOCH_KEYS):
            if saved and k in saved:
                t += float(saved[k])

    @staticmethod
    def _norm(params: list[torch.nn.Parameter], device) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=device)
        return torch.stack(torch._foreach_norm(grads)).float().square().sum().sqrt()

    @torch.no_grad()
    def before_forward(self) -> None:
        """With skips allowed: keep the floating-point buffers as they are before the forward."""
        if self.max_skips > 0 and self.buffers:
            self._buffer_backup = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def after_backward(self, loss: torch.Tensor, step: int, lr: float = float("nan")) -> torch.Tensor:
        nb, nh = self._norm(self.backbone_params, self.device), self._norm(self.head_params, self.device)
        loss = loss.detach().float()
        loss_ok = torch.isfinite(loss)
        finite = loss_ok & torch.isfinite(nb) & torch.isfinite(nh)
        if self.loss_scaling:
            overflow = loss_ok & ~finite
            self.overflow_streak = torch.where(overflow, self.overflow_streak + 1, 0.0)
            self.overflows += overflow.float()
            ok = loss_ok & (self.overflow_streak <= OVERFLOW_STREAK_MAX)
        else:
            ok = finite
        okf = ok.float()
        self.sums["grad_norm_backbone"] += torch.where(finite, nb, 0.0)
        self.sums["grad_norm_heads"] += torch.where(finite, nh, 0.0)
        self.norm_steps += finite.float()
        self.ok_steps += okf
        self.skipped += 1 - okf
        self.streak = torch.where(ok, 0.0, self.streak + 1)
        self.streak_loss = torch.where(self.streak == 1, loss, self.streak_loss)
        crossed = (self.streak == self.max_skips + 1) & (self.trip_step < 0)
        self.trip_step = torch.where(crossed, float(step - self.max_skips), self.trip_step)
        self.trip_loss = torch.where(crossed, self.streak_loss, self.trip_loss)
        self.last_finite_loss = torch.where(ok, loss, self.last_finite_loss)
        self.last_finite_step = torch.where(ok, float(step), self.last_finite_step)
        self._lrs[step] = lr
        if self.max_skips > 0:  # make a bad step a no-op for the weights
            grads = [p.grad for p in self.params if p.grad is not None]
            for g in grads:
                g.nan_to_num_(0.0, 0.0, 0.0)
            torch._foreach_mul_(grads, okf)
            self._backup = [p.detach().clone() for p in self.params]
        return ok

    @torch.no_grad()
    def restore(self, ok: torch.Tensor) -> None:
        """After ``optimizer.step()``: put back the parameters and buffers of a skipped step (no-op when ``ok``)."""
        if self._backup is not None:
            # p = p * ok + backup * (1 - ok), with the flag as a tensor (a Python scalar weight would
            # sync): exact either way, since both are finite (the step's gradients were zeroed).
            params, okf = [p.data for p in self.params], ok.float()
            torch._foreach_mul_(params, okf)
            torch._foreach_mul_(self._backup, 1 - okf)
            torch._foreach_add_(params, self._backup)
            self._backup = None
        if self._buffer_backup is not None:
            # where, not a blend: a NaN buffer times 0 is still NaN
            for b, old in zip(self.buffers, self._buffer_backup):
                b.copy_(torch.where(ok, b, old))
            self._buffer_backup = None

    def due(self, step: int) -> bool:
        return (step + 1) % self.check_every == 0

    def check(self, method: str, epoch: int) -> None:
        """Host look at the device counters; raises when the skip limit was crossed."""
        trip = int(self.trip_step)
        if trip >= 0:
            last = float(self.last_finite_loss)
            last_step = int(self.last_finite_step)
            lr = self._lrs.get(trip, float("nan"))
            skipped = f"; {self.max_skips} consecutive non-finite steps were skipped" if self.max_skips else ""
            if self.loss_scaling and math.isfinite(float(self.trip_loss)):
                raise NonFiniteLossError(
                    f"{method}: fp16: gradients non-finite for more than {OVERFLOW_STREAK_MAX} steps in a row, "
                    f"up to step {trip} "
                    f"(epoch {epoch}) at a finite loss {float(self.trip_loss):.6g}, while the loss scaler halved its "
                    "scale each time: the values exceed float16's range. Use train.precision=bf16 (GPUs of compute "
                    "capability 8.0 and up) or fp32. The last good checkpoint is kept.")
            raise NonFiniteLossError(
                f"{method}: non-finite loss {float(self.trip_loss)} or gradient at step {trip} (epoch {epoch})"
                f"{skipped}; "
                f"last finite loss {last:.6g} at step {last_step}, lr {lr:.4g}. The last good checkpoint is kept.")
        keep = max(self._lrs, default=0)
        self._lrs = {keep: self._lrs[keep]} if self._lrs else {}

    def epoch_metrics(self, steps: int) -> dict[str, torch.Tensor]:
        n = self.norm_steps.clamp_min(1)
        out = {"grad_norm_backbone": self.sums["grad_norm_backbone"] / n,
               "grad_norm_heads": self.sums["grad_norm_heads"] / n,
               "nonfinite_skipped_frac": self.skipped / max(1, steps)}
        if self.loss_scaling:
            out["amp_overflow_frac"] = self.overflows / max(1, steps)
        return out


def epoch_health(health: StepHealth, tap: Optional[EmbeddingTap], trained_steps: int, wait_seconds: float,
                 images_per_sec: float, world_size: int, epoch_steps: Optional[int] = None) -> dict[str, float]:
    """The epoch's health metrics, averaged over ranks in one all-reduce (the epoch end syncs anyway):
    grad norms, skipped fraction, collapse statistics, data wait and per-worker throughput.
    ``trained_steps``: steps this process ran (data wait); ``epoch_steps``: the epoch's steps, those
    before a mid-epoch resume included (the health sums carry them)."""
    from . import distributed as D

    dev_vals = health.epoch_metrics(trained_steps if epoch_steps is None else epoch_steps)
    if tap is not None:
        dev_vals.update(collapse_metrics(tap.take()))
    keys = list(dev_vals)
    vals = D.all_reduce_mean(torch.stack([dev_vals[k].float() for k in keys])).tolist()
    m = dict(zip(keys, vals))
    m["data_wait_ms_per_step"] = 1000.0 * wait_seconds / max(1, trained_steps)
    m["images_per_sec_per_worker"] = images_per_sec / max(1, world_size)
    return m
