"""Augmentation-policy ops for method x augmentation studies, applied inside ``ViewAugment``.

Each op takes a float batch (B, C, H, W) in [0, 1] on any device and returns one of the same shape,
drawing its random parameters per sample on the batch's device (``torch.rand(..., device=x.device)``),
so it follows the global torch seed like the rest of the view pipeline. Ops are pure tensor indexing
(one ``gather`` per batch, no Python loop over images), so they run on GPU as they run on CPU.

A *view policy* (``views.policy`` in the config, ``--views`` on the command line) maps a method's own
view spec ``[(AugParams, count), ...]`` to a modified one: ``default`` keeps it, the others replace or
extend each view's ``AugParams`` (for example, ``lorot`` appends the ``lorot`` op to every view).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ..augconfig import WHOLE_IMAGE_PRESETS
from ..registry import Registry

POLICIES: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("augmentation policy op")


def _gather(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out[b, c, p] = x[b, c, src[b, p]]`` over flattened pixels p = i * W + j; src is (B, H, W)."""
    b, c, h, w = x.shape
    idx = src.reshape(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, idx).reshape(b, c, h, w)


def _coords(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = x.shape[-2:]
    ii = torch.arange(h, device=x.device).view(1, h, 1)
    jj = torch.arange(w, device=x.device).view(1, 1, w)
    return ii, jj


def _coin(n: int, p: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) < p


# --- flips (the "orthogonality" policy) ---------------------------------------------------------

def flip_batch(x: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor) -> torch.Tensor:
    """Flip sample b left-right where ``hflip[b]`` and upside-down where ``vflip[b]`` (bool (B,))."""
    h, w = x.shape[-2:]
    ii, jj = _coords(x)
    si = torch.where(vflip.view(-1, 1, 1), h - 1 - ii, ii)
    sj = torch.where(hflip.view(-1, 1, 1), w - 1 - jj, jj)
    return _gather(x, si * w + sj)


@POLICIES.register("vflip")
def vflip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Vertical flip with probability ``p`` per sample."""
    off = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    return flip_batch(x, off, _coin(x.shape[0], p, x.device))


@POLICIES.register("flips")
def flips(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Horizontal and vertical flips, each with probability ``p``, drawn independently per sample:
    every output is one of the four orthogonal flips of its input (identity, h, v, both = rot180)."""
    n = x.shape[0]
    return flip_batch(x, _coin(n, p, x.device), _coin(n, p, x.device))


# --- LoRot-I: rotate one random box by a multiple of 90 degrees -----------------------------------

@dataclass(frozen=True)
class LoRotParams:
    """Per-sample box ``[top, top + height) x [left, left + width)`` and quarter turns ``k`` (all (B,))."""

    k: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor


def lorot_params(x: torch.Tensor, min_frac: float = 0.25, max_frac: float = 0.5,
                 turns: Sequence[int] = (1, 2, 3)) -> LoRotParams:
    """Draw a box whose sides are ``min_frac..max_frac`` of the image side and a turn count from
    ``turns`` per sample. LoRot-I (Moon et al. 2022) rotates a local region by 0/90/180/270 degrees;
    here 0 is left out by default so that every view is changed. A 90/270 turn maps an h x w box
    to w x h, so for odd ``k`` the box is square; 180 keeps any rectangle in place."""
    b, _, h, w = x.shape
    dev = x.device
    short = min(h, w)
    lo, hi = max(1, round(min_frac * short)), max(1, round(max_frac * short))
    t = torch.tensor(list(turns), device=dev)
    k = t[torch.randint(len(t), (b,), device=dev)]
    side = lambda: lo + (torch.rand(b, device=dev) * (hi - lo + 1)).long().clamp(max=hi - lo)
    height, width = side(), side()
    width = torch.where(k % 2 == 1, height, width)
    top = (torch.rand(b, device=dev) * (h - height + 1)).long().clamp(max=h - height)
    left = (torch.rand(b, device=dev) * (w - width + 1)).long().clamp(max=w - width)
    return LoRotParams(k, top, left, height, width)


def lorot_apply(x: torch.Tensor, p: LoRotParams) -> torch.Tensor:
    """Replace each sample's box by ``torch.rot90(box, k, dims=(-2, -1))``; pixels outside stay."""
    w = x.shape[-1]
    ii, jj = _coords(x)
    v = lambda t: t.view(-1, 1, 1)
    k, top, left, bh, bw = v(p.k % 4), v(p.top), v(p.left), v(p.height), v(p.width)
    u, s = ii - top, jj - left  # position inside the box
    inside = (u >= 0) & (u < bh) & (s >= 0) & (s < bw)
    # torch.rot90(A, k): k=1 out[u, s] = A[s, W-1-u]; k=2 A[H-1-u, W-1-s]; k=3 A[H-1-s, u] (square for odd k).
    su = torch.where(k == 1, s, torch.where(k == 2, bh - 1 - u, torch.where(k == 3, bh - 1 - s, u)))
    ss = torch.where(k == 1, bw - 1 - u, torch.where(k == 2, bw - 1 - s, torch.where(k == 3, u, s)))
    src = torch.where(inside, (top + su) * w + (left + ss), ii * w + jj)
    return _gather(x, src)


@POLICIES.register("lorot")
def lorot(x: torch.Tensor) -> torch.Tensor:
    """LoRot-I: one random box per sample rotated by 90, 180 or 270 degrees."""
    return lorot_apply(x, lorot_params(x))


# --- DCL region confusion: shuffle a grid of patches within a neighbourhood ------------------------

def dcl_permutation(b: int, grid: int, k: float, device) -> torch.Tensor:
    """Source patch index (row * grid + col) of every target patch, (B, grid * grid).

    Region confusion (Chen et al. 2019, used for SSL by Maaz et al. 2021): within each row of patches
    the columns are reordered by sorting ``j + r``, ``r ~ U(-k, k)``, then within each column the rows
    likewise, so a patch moves by less than 2k places along each axis. Both steps are permutations,
    so the result is one too: the image's pixels are rearranged, none is lost or repeated."""
    pos = torch.arange(grid, device=device, dtype=torch.float32)
    col_order = torch.argsort(pos + (torch.rand(b, grid, grid, device=device) * 2 - 1) * k, dim=2)  # [b, row, j]
    row_order = torch.argsort(pos + (torch.rand(b, grid, grid, device=device) * 2 - 1) * k, dim=2)  # [b, col, i]
    # After the row step P1[r, c] = P[r, col_order[r, c]]; after the column step P2[r, c] = P1[row_order[c, r], c].
    src_row = row_order.transpose(1, 2)  # [b, r, c] = row_order[b, c, r]
    src_col = col_order.gather(1, src_row)  # col_order[b, src_row[b, r, c], c]
    return (src_row * grid + src_col).reshape(b, grid * grid)


def dcl_apply(x: torch.Tensor, perm: torch.Tensor, grid: int) -> torch.Tensor:
    """Move patches by ``perm`` (from ``dcl_permutation``). The grid covers the largest multiple of
    ``grid`` pixels along each side; a remainder strip at the bottom/right stays where it is."""
    h, w = x.shape[-2:]
    ph, pw = h // grid, w // grid
    if ph == 0 or pw == 0:
        raise ValueError(f"dcl: a {grid}x{grid} grid does not fit a {h}x{w} image")
    ii, jj = _coords(x)
    in_grid = (ii < ph * grid) & (jj < pw * grid)
    pr, pc = (ii // ph).clamp(max=grid - 1), (jj // pw).clamp(max=grid - 1)
    target = (pr * grid + pc).expand(x.shape[0], h, w)
    src_patch = perm.gather(1, target.reshape(x.shape[0], -1)).reshape(x.shape[0], h, w)
    si = (src_patch // grid) * ph + ii % ph
    sj = (src_patch % grid) * pw + jj % pw
    return _gather(x, torch.where(in_grid, si * w + sj, ii * w + jj))


@POLICIES.register("dcl")
def dcl(x: torch.Tensor, grid: int = 4, k: float = 1.0) -> torch.Tensor:
    """Region confusion on a ``grid`` x ``grid`` patch grid with neighbourhood ``k`` (DCL uses k=1)."""
    return dcl_apply(x, dcl_permutation(x.shape[0], grid, k, x.device), grid)


# --- view policies: a method's view spec -> the study's variant of it ------------------------------

Spec = list  # [(AugParams, count), ...]
VIEW_POLICIES: Registry[Callable[..., Spec]] = Registry("view policy")


def _each(spec: Spec, fn) -> Spec:
    return [(fn(p), n) for p, n in spec]


def _add(p, op: str):
    return p if op in p.policies else replace(p, policies=p.policies + (op,))


@VIEW_POLICIES.register("default")
def default_policy(spec: Spec, cfg=None) -> Spec:
    """The method's own preset, unchanged."""
    return list(spec)


@VIEW_POLICIES.register("simclr")
def simclr_policy(spec: Spec, cfg=None) -> Spec:
    """SimCLR's photometric recipe on every view (each view keeps its own size and crop scale):
    jitter (0.8s, 0.8s, 0.8s, 0.2s) at p=0.8, grey 0.2, blur 0.5 when ``views.blur``, no solarize."""
    s = getattr(cfg, "jitter_strength", 0.5)
    blur = 0.5 if getattr(cfg, "blur", False) else 0.0
    return _each(spec, lambda p: replace(p, hflip_p=0.5, jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=0.8,
                                         grey_p=0.2, blur_p=blur, solarize_p=0.0))


@VIEW_POLICIES.register("orthogonality")
def orthogonality_policy(spec: Spec, cfg=None) -> Spec:
    """Random horizontal and vertical flips on top of the method's views (each p=0.5 per sample)."""
    return _each(spec, lambda p: _add(p, "vflip") if p.hflip_p > 0 else _add(p, "flips"))


@VIEW_POLICIES.register("lorot")
def lorot_policy(spec: Spec, cfg=None) -> Spec:
    """The method's views plus LoRot-I (one box per view rotated by 90/180/270 degrees)."""
    return _each(spec, lambda p: _add(p, "lorot"))


@VIEW_POLICIES.register("dcl")
def dcl_policy(spec: Spec, cfg=None) -> Spec:
    """The method's views plus DCL region confusion (4x4 patches shuffled within a neighbourhood of 1)."""
    return _each(spec, lambda p: _add(p, "dcl"))


@VIEW_POLICIES.register("mae")
def mae_policy(spec: Spec, cfg=None) -> Spec:
    """MAE-style views (He et al. 2022): random-resized crop (scale 0.2-1 for global views; local crops
    keep theirs) and a horizontal flip, no colour ops."""
    def crop_flip(p):
        scale = (0.2, 1.0) if p.scale[1] >= 1.0 else p.scale
        return replace(p, scale=scale, hflip_p=0.5, jitter_p=0.0, grey_p=0.0, blur_p=0.0, solarize_p=0.0)

    return _each(spec, crop_flip)


# WHOLE_IMAGE_PRESETS: presets whose views keep the whole image: the method draws the crops and flips
# itself, to know where every feature-map cell lies in the image, and then blurs and solarizes the crops
# (VICRegL). Defined beside the views.aug checks, which keep the same steps away from them.


def check_policy(preset: str | None, policy: str | None) -> None:
    """Refuse a view policy that ``preset`` cannot take (a ``ConfigError`` naming both keys)."""
    from ..config import ConfigError

    if preset in WHOLE_IMAGE_PRESETS and (policy or "default") != "default":
        raise ConfigError(
            f"views.policy={policy!r} does not apply to views.preset={preset!r}: its views keep the whole image, "
            f"and the method draws the crops, flips, blur and solarize itself and matches feature-map cells by "
            f"where they lie in the image. A policy's crop, flips, LoRot or DCL would move the cells under those "
            f"positions, and its colour steps would not reach the method's. Use views.policy=default.")


def apply_policy(spec: Spec, name: str = "default", cfg=None) -> Spec:
    """``build_views`` calls this with ``views.policy``: the method's spec -> the policy's spec."""
    check_policy(getattr(cfg, "preset", None), name)
    return VIEW_POLICIES.get(name or "default")(spec, cfg)


__all__ = ["POLICIES", "VIEW_POLICIES", "LoRotParams", "apply_policy", "dcl", "dcl_apply", "dcl_permutation",
           "flip_batch", "flips", "lorot", "lorot_apply", "lorot_params", "vflip"]
