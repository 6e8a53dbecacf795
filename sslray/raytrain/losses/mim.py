"""Masked image modelling: MAE's patch masking and pixel reconstruction loss (He et al., CVPR 2022)."""

from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, patch*patch*C), patches in row-major order (MAE's ``patchify``)."""
    if imgs.ndim != 4 or imgs.shape[2] % patch or imgs.shape[3] % patch:
        raise ValueError(f"patchify: expected (B, C, H, W) with H and W divisible by {patch}, got {tuple(imgs.shape)}")
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def num_masked(num_patches: int, mask_ratio: float) -> int:
    """Exactly ``round(mask_ratio * N)`` patches are masked."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(round(mask_ratio * num_patches))


def random_masking(batch: int, num_patches: int, mask_ratio: float, device=None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (MAE, sec. 3).

    Returns ``keep`` (B, N - M) indices of visible patches, ``mask`` (B, N) with 1 on the M masked
    patches, and ``restore`` (B, N), the permutation that puts [visible, mask tokens] back in order.
    """
    m = num_masked(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    keep = shuffle[:, : num_patches - m]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, : num_patches - m] = 0
    mask = torch.gather(mask, 1, restore)
    return keep, mask, restore


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
             eps: float = 1e-6) -> torch.Tensor:
    """MAE reconstruction loss (sec. 3, "Reconstruction target"): per-patch MSE averaged over the masked
    patches only. ``pred`` and ``target`` (B, L, P) with ``target`` from :func:`patchify`; ``mask``
    (B, L) with 1 = masked. ``norm_pix`` normalises each target patch by its own mean and variance
    (the paper's default for better representations)."""
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(f"mae_loss: pred and target must be the same (B, L, P), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mae_loss: mask must be (B, L) = {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")
    target = target.float()
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
