"""Self-distillation: DINO's cross-entropy between a centred, sharpened teacher and the student
(Caron et al., ICCV 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def dino_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], center: torch.Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """DINO (alg. 1, eq. 3): ``H(P_t(x), P_s(x'))`` summed over every teacher crop (the globals) and
    every student crop that is a different view, averaged over pairs and samples.

    ``student`` is a list of (B, K) logits, one per crop (globals first); ``teacher`` one per global
    crop; ``center`` (K,) or (1, K) is subtracted from the teacher logits before sharpening with
    ``teacher_temp`` (0.04 after warm-up from 0.04, paper default; student 0.1).
    """
    if len(teacher) < 1 or len(student) < 2 or len(teacher) > len(student):
        raise ValueError(f"dino_loss: need >= 2 student crops and 1..{len(student)} teacher crops, "
                         f"got {len(student)} and {len(teacher)}")
    ref = teacher[0].shape
    for name, outs in (("student", student), ("teacher", teacher)):
        for i, t in enumerate(outs):
            if t.ndim != 2 or t.shape[1] != ref[1] or t.shape[0] != ref[0]:
                raise ValueError(f"dino_loss: {name} crop {i} is {tuple(t.shape)}, expected {tuple(ref)} (B, K)")
    if center.numel() != ref[1]:
        raise ValueError(f"dino_loss: center has {center.numel()} entries, outputs have K={ref[1]}")
    center = center.reshape(1, -1)
    total, terms = 0.0, 0
    for iq, t in enumerate(teacher):
        q = F.softmax((t.detach().float() - center) / teacher_temp, dim=1)
        for v, s in enumerate(student):
            if v == iq:
                continue  # a crop never predicts itself
            total = total - (q * F.log_softmax(s.float() / student_temp, dim=1)).sum(1).mean()
            terms += 1
    return total / terms


@torch.no_grad()
def update_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """DINO centre (eq. 4): ``c <- m c + (1 - m) mean_batch(g_t(x))``, m=0.9. ``batch_mean`` must be the
    mean over the *global* batch (all_reduce it under DDP). Updates ``center`` in place and returns it."""
    if batch_mean.numel() != center.numel():
        raise ValueError(f"update_center: batch mean has {batch_mean.numel()} entries, centre {center.numel()}")
    return center.mul_(momentum).add_(batch_mean.reshape(center.shape).to(center.dtype), alpha=1 - momentum)
