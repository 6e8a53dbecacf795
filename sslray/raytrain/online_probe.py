"""Online linear probe: a linear classifier trained beside the SSL objective on detached backbone features.

Every training step the probe takes the backbone features of the step's first view, which the
training forward already computed (caught by the loop's ``EmbeddingTap`` on the projector's input,
detached: parameters, gradients, BN statistics and the RNG streams of the run are untouched, so the
SSL trajectory is the same with or without it), and takes one step of its own optimizer on
cross-entropy with the batch's labels. Methods without a projector (MAE, whose encoder sees only
visible patches) instead encode the clean batch with the backbone in eval mode under ``no_grad``
(``step``), at the cost of one extra forward per step. At the end of each epoch it scores the val split, and the
loop reports ``online_probe_top1`` / ``online_probe_top5`` (val), ``online_probe_train_top1`` and
``online_probe_train_loss`` (running over the epoch's steps, before each update) so Tune can stop
trials on them (the online evaluation of BYOL, sec. 4, and solo-learn).

Features are standardised per dimension before the linear layer, a BatchNorm without affine
parameters as in MAE's and MoCo v3's linear probes: the backbone's feature scale drifts during
pretraining and raw features are badly conditioned. The statistics are those of the global batch
(the features are detached, so the sums are all-reduced without autograd) and their running averages
serve for the val split. The optimizer is Adam (lr 1e-3, no decay), which tolerated the changing
feature scale best in a comparison on CIFAR-10 features (SGD at 0.1/0.01, raw/per-sample/per-dim
standardisation). Under data parallelism the probe's gradients are averaged over ranks after
backward, like the model's (see ``distributed.data_parallel``), so every rank holds the same probe,
equal to the one-process probe on the global batch. Its weights, normalisation statistics,
optimizer state and running counters go into the checkpoint, so resume is exact.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .knn import extract_features, top5_k
from .optim import load_optimizer_state


class OnlineProbe:
    """``step(backbone, x, y)`` every training step; ``epoch_metrics(backbone, val)`` at epoch end."""

    def __init__(self, feat_dim: int, num_classes: int, transform: nn.Module, device: torch.device,
                 lr: float = 1e-3, precision: str = "auto", channels_last: bool = False, seed: int = 0,
                 norm_momentum: float = 0.1, max_batch: int = 0):
        if num_classes < 2:
            raise ValueError(f"online probe needs labelled data with >= 2 classes, got {num_classes}")
        with torch.random.fork_rng(devices=[]):  # its own init stream: the run's RNG (views) stays as it was
            torch.manual_seed(seed)
            self.head = nn.Linear(feat_dim, num_classes).to(device)
        D.broadcast_parameters(self.head)  # every rank starts from rank 0's probe
        self.opt = torch.optim.Adam(self.head.parameters(), lr=lr)
        self.running_mean = torch.zeros(feat_dim, device=device)
        self.running_var = torch.ones(feat_dim, device=device)
        self.norm_momentum, self.max_batch = norm_momentum, max_batch
        self.transform, self.device = transform, device
        self.precision, self.channels_last = precision, channels_last
        self.num_classes = num_classes
        # Running sums over this epoch's steps on this rank: correct, seen, summed loss.
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    @classmethod
    def from_config(cls, cfg, model: nn.Module, num_classes: int, transform: nn.Module,
                    device: torch.device) -> Optional["OnlineProbe"]:
        """The run's probe, or ``None`` when ``train.online_probe`` is off or the data has no labels."""
        tc = cfg.train
        if not tc.online_probe or num_classes < 2:
            return None
        cl = tc.channels_last and device.type == "cuda"
        feat_dim = _feature_dim(model.backbone, transform, cfg.views.crop_size, device)
        return cls(feat_dim, num_classes, transform, device, tc.online_probe_lr, precision=tc.precision,
                   channels_last=cl, seed=tc.seed, max_batch=tc.online_probe_batch)

    def features(self, backbone: nn.Module, batches: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        return extract_features(backbone, batches, self.transform, self.device, self.precision, self.channels_last)

    @torch.no_grad()
    def _standardise_train(self, f: torch.Tensor, okf: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Global-batch statistics (all ranks), then the running averages move towards them (not on a
        step whose ``okf`` is 0)."""
        n = torch.tensor([float(f.shape[0])], device=f.device)
        s = D.all_reduce_mean(torch.cat([f.sum(0), (f * f).sum(0), n])) * D.world_size()
        d, total = f.shape[1], s[-1]
        mean = s[:d] / total
        var = (s[d : 2 * d] / total - mean * mean).clamp_min(0)
        if okf is None:
            m = self.norm_momentum
            self.running_mean.mul_(1 - m).add_(mean, alpha=m)
            self.running_var.mul_(1 - m).add_(var * total / (total - 1).clamp_min(1), alpha=m)
        else:  # a tensor momentum: no host sync
            m = okf * self.norm_momentum
            self.running_mean.mul_(1 - m).add_(mean * m)
            self.running_var.mul_(1 - m).add_(var * total / (total - 1).clamp_min(1) * m)
        return (f - mean) * torch.rsqrt(var + 1e-5)

    def step(self, backbone: nn.Module, x: torch.Tensor, y: torch.Tensor, ok: Optional[torch.Tensor] = None) -> None:
        """One Adam step on this rank's labelled batch ``(x uint8, y)``, encoded here with the eval
        transform (one extra backbone forward, on its first ``max_batch`` images when set, so it stays
        small beside e.g. MAE's step, which encodes a quarter of the patches); gradients averaged over ranks."""
        if self.max_batch:
            x, y = x[: self.max_batch], y[: self.max_batch]
        f, y = self.features(backbone, [(x, y)])
        self.step_features(f, y, ok)

    def step_features(self, f: torch.Tensor, y: torch.Tensor, ok: Optional[torch.Tensor] = None) -> None:
        """One Adam step on features the training forward already computed (detached here): the
        loop's default, since it costs no extra forward (solo-learn's online classifier does the
        same, on the first augmented view).

        ``ok`` (a 0-d bool on the device, the training step's health flag): when false the step's
        features are not learnt from: zero gradient, running statistics and epoch sums unchanged, so
        NaN features of a skipped step leave no NaN behind. Adam's moments still decay by one step;
        no host sync is needed."""
        f, y = f.detach().float(), y.to(f.device).long().view(-1)
        okf = None
        if ok is not None:
            okf = ok.to(f.device).float()
            f = torch.where(ok, f, 0.0)
        logits = self.head(self._standardise_train(f, okf))
        loss = F.cross_entropy(logits, y)
        if okf is not None:
            loss = loss * okf
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        D.all_reduce_gradients(self.head)
        self.opt.step()
        with torch.no_grad():
            n = y.shape[0]
            counts = torch.stack([(logits.argmax(1) == y).sum().double(), torch.tensor(float(n), dtype=torch.float64,
                                  device=self.device), loss.detach().double() * n])
            self.sums += counts if okf is None else counts * okf.double()

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, batches: Iterable) -> dict:
        """Top-1/top-5 of the current probe on every rank's shard of ``batches``, summed over ranks."""
        f, y = self.features(backbone, batches)
        f = (f - self.running_mean) * torch.rsqrt(self.running_var + 1e-5)
        top = self.head(f).topk(top5_k(self.num_classes), dim=1).indices
        hit = top == y.view(-1, 1)
        c = torch.stack([hit[:, :1].any(1).sum(), hit.any(1).sum(), torch.tensor(y.shape[0], device=y.device)])
        c = D.all_reduce_mean(c.double()) * D.world_size()
        n = max(1.0, float(c[2]))
        return {"online_probe_top1": float(c[0]) / n, "online_probe_top5": float(c[1]) / n}

    def epoch_metrics(self, backbone: nn.Module, val: Optional[Iterable]) -> dict:
        """The epoch's running train accuracy and loss (all ranks), the val scores, then a reset."""
        s = D.all_reduce_mean(self.sums) * D.world_size()
        out = {}
        if float(s[1]) > 0:
            out = {"online_probe_train_top1": float(s[0] / s[1]), "online_probe_train_loss": float(s[2] / s[1])}
        if val is not None:
            out.update(self.evaluate(backbone, val))
        self.sums.zero_()
        return out

    def global_sums(self) -> torch.Tensor:
        """The epoch's running sums over every rank (a collective: call it on all ranks)."""
        return D.all_reduce_mean(self.sums) * D.world_size()

    def state_dict(self, sums: Optional[torch.Tensor] = None) -> dict:
        """``sums``: the all-rank sums from ``global_sums`` (a checkpoint holds them once, for rank 0)."""
        return {"head": self.head.state_dict(), "optimizer": self.opt.state_dict(),
                "sums": (self.sums if sums is None else sums).clone(),
                "running_mean": self.running_mean.clone(), "running_var": self.running_var.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        load_optimizer_state(self.opt, state["optimizer"])  # this run's online_probe_lr
        # The saved sums are every rank's together: rank 0 carries them on, the others start from zero,
        # so the epoch's all-reduced figures count each rank's part once.
        if D.rank() == 0:
            self.sums.copy_(state["sums"])
        else:
            self.sums.zero_()
        self.running_mean.copy_(state["running_mean"])
        self.running_var.copy_(state["running_var"])


@torch.no_grad()
def _feature_dim(backbone: nn.Module, transform: nn.Module, size: int, device: torch.device) -> int:
    x = torch.zeros(2, 3, size, size, dtype=torch.uint8, device=device)
    f, _ = extract_features(backbone, [(x, torch.zeros(2, dtype=torch.long))], transform, device, "fp32")
    return int(f.shape[-1])


__all__ = ["OnlineProbe"]
