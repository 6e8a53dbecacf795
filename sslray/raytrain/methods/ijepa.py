"""I-JEPA (Assran et al., CVPR 2023): from one context block of an image, a narrow ViT predictor predicts
the representations that an EMA target encoder gives four target blocks of the same image. No pixels are
reconstructed and no views are augmented beyond a random-resized crop.

The context encoder is the run's timm ViT (``backbone``, the one probed and exported), run on the
context patches only; it is built without a class token and with average pooling of its normed patch
tokens, the paper's evaluation feature (the mean of the last layer's tokens), which ``backbone(x)`` gives.
"""

from __future__ import annotations

import math

import torch
from timm.models import checkpoint_seq
from torch import nn

from ...config import ConfigError
from ..backbones import create_backbone, trunk_modules
from ..losses import ijepa_loss, multiblock_masks
from . import register_method
from ._ema import EMATeacher, check_momentum_end, ema_momentum
from ._posembed import fix_sincos_pos_embed, sincos_pos_embed


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Tokens ``x`` (B, N, D) at ``idx`` (B, K)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _paper_init(linears: list[nn.Module], blocks: nn.Sequential) -> None:
    """The paper code's ``_init_weights`` and ``fix_init_weight``: Linears N(0, 0.02) truncated, zero
    biases; each block's attention and MLP output projections divided by sqrt(2 * layer), 1-based."""
    for m in linears:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    with torch.no_grad():
        for i, blk in enumerate(blocks, 1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))


class Predictor(nn.Module):
    """I-JEPA's ``VisionTransformerPredictor``: the context tokens projected to ``dim`` plus their fixed
    sin-cos positions, then one learned mask token per target position plus its position; ``depth``
    blocks; the outputs at the target positions projected back to the encoder width."""

    def __init__(self, enc_dim: int, grid: int, dim: int = 384, depth: int = 6, heads: int = 0):
        super().__init__()
        from timm.models.vision_transformer import Block

        heads = heads or max(1, dim // 64)
        if dim % heads:
            raise ValueError(f"method.params.pred_heads {heads} must divide method.params.pred_dim {dim}")
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", sincos_pos_embed(dim, grid).unsqueeze(0), persistent=False)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, enc_dim)
        _paper_init([*self.blocks.modules(), self.embed, self.proj], self.blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, ctx: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
        """``ctx`` (B, Kc, D_enc) at ``ctx_idx`` (B, Kc) -> predictions (M, B, Kt, D_enc) at ``tgt_idx``
        (M, B, Kt): the M blocks in one batch of M * B sequences, each with its image's context."""
        m, b, kt = tgt_idx.shape
        pos = self.pos.expand(b, -1, -1)
        x = self.embed(ctx) + _gather(pos, ctx_idx)
        x = x.repeat(m, 1, 1)
        queries = self.mask_token + _gather(pos.repeat(m, 1, 1), tgt_idx.reshape(m * b, kt))
        x = self.norm(self.blocks(torch.cat([x, queries], 1)))
        return self.proj(x[:, -kt:]).reshape(m, b, kt, -1)


class IJEPA(nn.Module):
    family = "MIM"

    def __init__(self, backbone: nn.Module, pred_dim: int = 384, pred_depth: int = 6, pred_heads: int = 0,
                 num_targets: int = 4, target_scale: tuple[float, float] = (0.15, 0.2),
                 target_aspect: tuple[float, float] = (0.75, 1.5), context_scale: tuple[float, float] = (0.85, 1.0),
                 min_context: int = 10, momentum: float = 0.996, momentum_end: float = 1.0,
                 momentum_schedule: str = "linear"):
        super().__init__()
        needed = ("patch_embed", "blocks", "norm", "pos_embed")
        if not all(hasattr(backbone, a) for a in needed) or getattr(backbone, "num_prefix_tokens", 0):
            raise ValueError(f"I-JEPA needs a timm VisionTransformer without class or register tokens, "
                             f"got {type(backbone).__name__}")
        gh, gw = backbone.patch_embed.grid_size
        if gh != gw:
            raise ValueError(f"I-JEPA: square patch grids only, got {gh}x{gw}")
        self.grid = gh
        fix_sincos_pos_embed(backbone)  # the paper's encoder: fixed 2-D sin-cos positions
        _paper_init(list(backbone.blocks.modules()), backbone.blocks)
        self.backbone = backbone
        self.predictor = Predictor(backbone.embed_dim, gh, pred_dim, pred_depth, pred_heads)
        self.target = EMATeacher(backbone)  # starts equal to the context encoder (sec. 3)
        self.masks = dict(num_targets=num_targets, target_scale=target_scale, target_aspect=target_aspect,
                          context_scale=context_scale, min_context=min_context)
        self.base_momentum, self.momentum_end, self.momentum_schedule = momentum, momentum_end, momentum_schedule

    def _tokens(self, vit: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus position of every patch, (B, N, D)."""
        x = vit.patch_embed(imgs)
        if x.ndim == 4:  # dynamic-size ViTs emit NHWC
            x = x.flatten(1, 2)
        return x + vit.pos_embed

    def _blocks(self, vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = vit.norm_pre(x) if hasattr(vit, "norm_pre") else x
        if getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled():
            return vit.norm(checkpoint_seq(vit.blocks, x))  # model.grad_checkpointing: recomputed in backward
        return vit.norm(vit.blocks(x))

    def encode_context(self, imgs: torch.Tensor, ctx_idx: torch.Tensor) -> torch.Tensor:
        """The context encoder on the context patches only: (B, Kc, D)."""
        return self._blocks(self.backbone, _gather(self._tokens(self.backbone, imgs), ctx_idx))

    @torch.no_grad()
    def encode_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """The EMA target encoder on every patch: (B, N, D), before the loss's layer norm."""
        vit = self.target.module[0]
        return self._blocks(vit, self._tokens(vit, imgs))

    def compile_targets(self) -> list[nn.Module]:
        """``model.compile``: the blocks of both encoders and of the predictor; masks and gathers stay eager."""
        return [*trunk_modules(self.backbone), *trunk_modules(self.target.module[0]), *self.predictor.blocks]

    def forward(self, views):
        if len(views) != 1:
            raise ValueError(f"I-JEPA takes exactly 1 view, got {len(views)}")
        imgs = views[0]
        ctx_idx, tgt_idx = (t.to(imgs.device, non_blocking=True)
                            for t in multiblock_masks(imgs.shape[0], self.grid, **self.masks))
        pred = self.predictor(self.encode_context(imgs, ctx_idx), ctx_idx, tgt_idx)
        return {"loss": ijepa_loss(pred, self.encode_targets(imgs), tgt_idx)}

    def on_step(self, step: int, total: int) -> None:
        self.target.update(self.backbone, momentum=ema_momentum(step, total, self.base_momentum,
                                                                self.momentum_schedule, self.momentum_end))


@register_method("ijepa")
def build_ijepa(cfg, backbone, feat_dim, patch_size: int = 0, pred_dim: int = 384, pred_depth: int = 6,
                pred_heads: int = 0, num_targets: int = 4, target_scale_min: float = 0.15,
                target_scale_max: float = 0.2, target_aspect_min: float = 0.75, target_aspect_max: float = 1.5,
                context_scale_min: float = 0.85, context_scale_max: float = 1.0, min_context: int = 10,
                momentum: float = 0.996, momentum_end: float = 1.0, momentum_schedule: str = "linear"):
    """Paper defaults (sec. 4, appendix A): 4 target blocks of scale 0.15-0.2 and aspect ratio 0.75-1.5,
    one context block of scale 0.85-1 (aspect 1) without the target patches; target momentum 0.996 -> 1
    along a straight line (``momentum_schedule``: linear, cosine or constant). The predictor is 384
    wide as the paper's (12 blocks there, for ViT-H; 6 by default here, for the smaller ViTs),
    ``pred_heads`` 0: ``pred_dim // 64``. ``min_context``: the fewest context patches before the masks
    relax (the paper code's ``min_keep``). The ViT is rebuilt without a class token, averaging its
    normed patch tokens (the features probed and exported), at the crop size, and with ``patch_size``
    when above 0 (e.g. 4 for 32-px CIFAR: 8x8 patches)."""
    if momentum_schedule not in ("linear", "cosine", "constant"):
        raise ConfigError(f"config key 'method.params.momentum_schedule': linear, cosine or constant, "
                          f"got {momentum_schedule!r}")
    check_momentum_end(momentum, momentum_end, momentum_schedule)
    for key, lo, hi, ok in (("target_scale", target_scale_min, target_scale_max, target_scale_max < 1),
                            ("context_scale", context_scale_min, context_scale_max, context_scale_max <= 1),
                            ("target_aspect", target_aspect_min, target_aspect_max, True)):
        if not (0 < lo <= hi and ok):
            raise ConfigError(f"config keys 'method.params.{key}_min' and '_max': need 0 < min <= max (a scale "
                              f"at most 1, a target's below 1), got {lo}, {hi}")
    if num_targets < 1 or min_context < 1:
        raise ConfigError(f"config keys 'method.params.num_targets' and 'min_context' must be 1 or more, got "
                          f"{num_targets}, {min_context}")
    size = cfg.views.crop_size
    if not hasattr(backbone, "patch_embed"):
        raise ValueError(f"I-JEPA needs a timm VisionTransformer backbone, got model.backbone "
                         f"{cfg.model.backbone!r} ({type(backbone).__name__})")
    patch = patch_size or int(backbone.patch_embed.patch_size[0])
    if size % patch:
        raise ValueError(f"method.params.patch_size {patch} must divide views.crop_size {size}")
    # fc_norm off: the final LayerNorm stays on the tokens (the loss trains it), then they are averaged
    backbone = create_backbone(cfg.model.backbone, img_size=size, patch_size=patch, class_token=False,
                               global_pool="avg", fc_norm=False)
    return IJEPA(backbone, pred_dim, pred_depth, pred_heads, num_targets, (target_scale_min, target_scale_max),
                 (target_aspect_min, target_aspect_max), (context_scale_min, context_scale_max), min_context,
                 momentum, momentum_end, momentum_schedule)


build_ijepa.family = IJEPA.family
build_ijepa.default_views = "ijepa"
