"""Masked image modelling: MAE's patch masking and pixel reconstruction loss (He et al., CVPR 2022), and
I-JEPA's multi-block masks and feature prediction loss (Assran et al., CVPR 2023)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def _block_size(u: float, scale: tuple[float, float], aspect: tuple[float, float], grid: int) -> tuple[int, int]:
    """I-JEPA's ``_sample_block_size``: one uniform draw ``u`` sets both the fraction of the ``grid``^2
    patches and the aspect ratio h / w; each side is shrunk below the grid side, as the paper code does."""
    n = int(grid * grid * (scale[0] + u * (scale[1] - scale[0])))
    ar = aspect[0] + u * (aspect[1] - aspect[0])
    h, w = round(math.sqrt(n * ar)), round(math.sqrt(n / ar))
    return max(1, min(h, grid - 1)), max(1, min(w, grid - 1))


def _blocks(shape: tuple[int, ...], h: int, w: int, grid: int) -> torch.Tensor:
    """Boolean (*shape, grid * grid) masks of h x w rectangles at uniformly drawn positions (every
    placement inside the grid; the paper code's ``randint(0, grid - h)`` never reaches the last one)."""
    top = (torch.rand(shape) * (grid - h + 1)).long().unsqueeze(-1)
    left = (torch.rand(shape) * (grid - w + 1)).long().unsqueeze(-1)
    r = torch.arange(grid)
    rows, cols = (r >= top) & (r < top + h), (r >= left) & (r < left + w)
    return (rows.unsqueeze(-1) & cols.unsqueeze(-2)).flatten(-2)


def _first_k(mask: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` set positions of each row of ``mask`` (..., N), in raster order."""
    return torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)[..., :k]


def multiblock_masks(batch: int, grid: int, num_targets: int = 4, target_scale: tuple[float, float] = (0.15, 0.2),
                     target_aspect: tuple[float, float] = (0.75, 1.5), context_scale: tuple[float, float] = (0.85, 1.0),
                     min_context: int = 10, tries: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """I-JEPA's multi-block masks (sec. 3, the paper code's ``MaskCollator``) on a ``grid`` x ``grid`` patch
    grid: ``context`` (B, Kc) and ``targets`` (num_targets, B, Kt) patch indices, ascending.

    Per batch one target block size (scale ``target_scale``, aspect ``target_aspect``) and one context
    block size (``context_scale``, aspect 1), as the collator draws them; per image ``num_targets``
    target blocks and one context block, from which every target patch is removed. Made on the host
    from torch's CPU RNG, as the paper's collator does in the loader: the kept counts are data-dependent
    (the batch minimum below), and reading them from a device would stall it every step.

    Of ``tries`` context positions per image the first leaving at least ``min_context`` patches is taken;
    where none does, the exclusion is relaxed one target block at a time from the last (the collator's
    ``constrain_mask``), which lets context and targets overlap there. Every index list is then cut to
    the batch's smallest count (the collator's ``min_keep`` truncation), so the tensors are rectangular.
    """
    if not (0 < target_scale[0] <= target_scale[1] < 1 and 0 < context_scale[0] <= context_scale[1] <= 1):
        raise ValueError(f"multiblock_masks: scales must be in (0, 1], got target {target_scale}, "
                         f"context {context_scale}")
    if grid < 2 or num_targets < 1:
        raise ValueError(f"multiblock_masks: needs a grid of 2+ patches a side and 1+ targets, got {grid}, "
                         f"{num_targets}")
    u_t, u_c = torch.rand(2).numpy().tolist()  # host tensors: no device to wait for
    th, tw = _block_size(u_t, target_scale, target_aspect, grid)
    ch, cw = _block_size(u_c, context_scale, (1.0, 1.0), grid)
    targets = _blocks((num_targets, batch), th, tw, grid)  # (M, B, N)
    block = _blocks((batch, tries), ch, cw, grid)  # (B, R, N)
    # unions[j]: the first j target blocks together; flipped, the context excludes all M first, then fewer
    unions = torch.cumsum(torch.cat([torch.zeros_like(targets[:1]), targets]).int(), 0).bool()
    context = block.unsqueeze(0) & ~unions.flip(0).unsqueeze(2)  # (M + 1, B, R, N)
    ok = context.sum(-1) >= min(min_context, ch * cw)  # (M + 1, B, R); j = 0 always holds
    pick = ok.permute(1, 0, 2).reshape(batch, -1).int().argmax(1)  # the first acceptable (relaxation, try)
    context = context.permute(1, 0, 2, 3).reshape(batch, -1, grid * grid)[torch.arange(batch), pick]
    kc = int(context.sum(-1).min().numpy())
    return _first_k(context, kc), _first_k(targets, th * tw)


def ijepa_loss(pred: torch.Tensor, target_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """I-JEPA's loss (sec. 3, the paper code's ``F.smooth_l1_loss``): the predictions ``pred`` (M, B, K, D)
    of the M target blocks against the target encoder's tokens ``target_tokens`` (B, N, D) of all
    patches, each layer-normed over features (no affine) and taken at the blocks' positions ``targets``
    (M, B, K). The mean over every predicted token: with equal K per block, the mean over the blocks of
    each block's mean. No gradient reaches the targets."""
    if pred.ndim != 4 or targets.shape != pred.shape[:3] or target_tokens.shape[0] != pred.shape[1]:
        raise ValueError(f"ijepa_loss: expected pred (M, B, K, D), target_tokens (B, N, D), targets (M, B, K), got "
                         f"{tuple(pred.shape)}, {tuple(target_tokens.shape)}, {tuple(targets.shape)}")
    h = target_tokens.detach().float()
    h = F.layer_norm(h, h.shape[-1:])
    idx = targets.unsqueeze(-1).expand(-1, -1, -1, h.shape[-1])
    want = torch.gather(h.unsqueeze(0).expand(targets.shape[0], -1, -1, -1), 2, idx)
    return F.smooth_l1_loss(pred.float(), want)
