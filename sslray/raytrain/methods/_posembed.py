"""The fixed 2-D sine-cosine position embedding of MAE and MoCo v3, for a timm ViT."""

from __future__ import annotations

import torch
from torch import nn


def sincos_pos_embed(dim: int, grid: int | tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (rows * cols, dim) for a ``grid`` of patches (an int:
    square), tokens in row-major order as a timm ViT lays them out.

    Each token's row fills the first half of ``dim`` and its column the second, each half
    ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_k = 1 / 10000^(k / (dim / 4))``, k < dim / 4:
    MoCo v3's ``build_2d_sincos_position_embedding`` (temperature 10000). MAE's code puts the column
    half first: the same embedding of the transposed grid."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    ys, xs = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        out = pos[:, None] * omega[None]
        parts += [out.sin(), out.cos()]
    return torch.cat(parts, 1).float()


def fix_sincos_pos_embed(vit: nn.Module) -> bool:
    """Overwrite a timm ViT's learned ``pos_embed`` with the fixed sin-cos one, zero for the class (and
    any other prefix) tokens, and freeze it (``requires_grad`` False, so the optimizer leaves it out):
    MAE's and MoCo v3's encoders. False, and nothing changed, for a backbone without one (a ResNet)."""
    pos = getattr(vit, "pos_embed", None)
    if not isinstance(pos, nn.Parameter):
        return False
    prefix = 0 if getattr(vit, "no_embed_class", False) else getattr(vit, "num_prefix_tokens", 0)
    with torch.no_grad():
        pos.zero_()
        pos[0, prefix:].copy_(sincos_pos_embed(pos.shape[-1], tuple(vit.patch_embed.grid_size)))
    pos.requires_grad_(False)
    return True
