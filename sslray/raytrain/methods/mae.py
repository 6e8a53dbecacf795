"""MAE (He et al., CVPR 2022): a timm ViT encodes only the visible patches; a lightweight transformer
decoder reconstructs the pixels of the masked ones; the loss (``norm_pix_loss``) is on masked patches only."""

from __future__ import annotations

import torch
from timm.models import checkpoint_seq
from torch import nn

from ..backbones import create_backbone, trunk_modules
from ..losses import mae_loss, patchify, random_masking
from . import register_method
from ._posembed import fix_sincos_pos_embed, sincos_pos_embed


class MAE(nn.Module):
    family = "MIM"

    def __init__(self, backbone: nn.Module, mask_ratio: float = 0.75, norm_pix: bool = True, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, paper_init: bool = True):
        super().__init__()
        from timm.models.vision_transformer import Block

        needed = ("patch_embed", "blocks", "norm", "pos_embed", "cls_token")
        if not all(hasattr(backbone, a) for a in needed) or getattr(backbone, "reg_token", None) is not None:
            raise ValueError(f"MAE needs a timm VisionTransformer backbone without register tokens, "
                             f"got {type(backbone).__name__}")
        self.backbone = backbone
        self.patch = int(backbone.patch_embed.patch_size[0])
        gh, gw = backbone.patch_embed.grid_size
        if gh != gw:
            raise ValueError(f"MAE: square patch grids only, got {gh}x{gw}")
        self.num_patches = gh * gw
        self.mask_ratio, self.norm_pix = mask_ratio, norm_pix
        dim = backbone.embed_dim
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos", torch.cat([torch.zeros(1, decoder_dim), sincos_pos_embed(decoder_dim, gh)])
                             .unsqueeze(0), persistent=False)
        self.decoder = nn.Sequential(*(Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                                       for _ in range(decoder_depth)))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch**2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        if paper_init:
            self._paper_init()

    def _paper_init(self) -> None:
        """The paper code's initialisation (App. A.1): the encoder's position embedding is the fixed 2-D
        sin-cos one (zero for the class token), not learned; every Linear xavier-uniform with zero bias,
        the patch projection xavier-uniform as a Linear on its flattened weight, LayerNorms at (1, 0),
        the class token N(0, 0.02). timm's ViT otherwise starts from a learned, truncated-normal one."""
        bb = self.backbone
        fix_sincos_pos_embed(bb)
        for m in (*bb.blocks.modules(), *self.decoder.modules(), self.decoder_embed, self.decoder_pred):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = bb.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(bb.cls_token, std=0.02)

    def encode_visible(self, imgs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The ViT on visible patches only: patch embed + position, gather ``keep``, prepend the class token."""
        bb = self.backbone
        x = bb.patch_embed(imgs)
        if x.ndim == 4:  # dynamic-size ViTs emit NHWC
            x = x.flatten(1, 2)
        prefix = 0 if getattr(bb, "no_embed_class", False) else bb.num_prefix_tokens
        x = x + bb.pos_embed[:, prefix:]
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = bb.cls_token + (bb.pos_embed[:, :1] if prefix else 0)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], 1)
        x = bb.norm_pre(x) if hasattr(bb, "norm_pre") else x
        if getattr(bb, "grad_checkpointing", False) and torch.is_grad_enabled():
            return bb.norm(checkpoint_seq(bb.blocks, x))  # model.grad_checkpointing: blocks recomputed in backward
        return bb.norm(bb.blocks(x))

    def compile_targets(self) -> list[nn.Module]:
        """``model.compile``: each transformer block (encoder and decoder); the masking, gathers and
        patchify around them stay eager. Per-block graphs also compile once for all blocks of a width."""
        return [*trunk_modules(self.backbone), *self.decoder]

    def decode(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, n_vis = x.shape[0], x.shape[1] - 1
        masks = self.mask_token.expand(b, self.num_patches - n_vis, -1)
        tokens = torch.cat([x[:, 1:], masks], 1)
        tokens = torch.gather(tokens, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], tokens], 1) + self.decoder_pos
        x = self.decoder_norm(self.decoder(x))
        return self.decoder_pred(x[:, 1:])

    def forward(self, views):
        if len(views) != 1:
            raise ValueError(f"MAE takes exactly 1 view, got {len(views)}")
        imgs = views[0]
        keep, mask, restore = random_masking(imgs.shape[0], self.num_patches, self.mask_ratio, imgs.device)
        pred = self.decode(self.encode_visible(imgs, keep), restore)
        loss = mae_loss(pred, patchify(imgs, self.patch), mask, self.norm_pix)
        return {"loss": loss}

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masked input, reconstruction)`` of normalised images for a picture (the MAE demo): masked
        patches zeroed in the input; the reconstruction keeps the visible patches and pastes the
        prediction into the masked ones, un-normalised with each patch's own mean and variance when
        the model predicts normalised pixels. ``generator`` fixes the mask without touching the
        global RNG."""
        b, c, h, w = imgs.shape
        keep, mask, restore = random_masking(b, self.num_patches, self.mask_ratio, imgs.device, generator=generator)
        pred = self.decode(self.encode_visible(imgs, keep), restore).float()
        target = patchify(imgs, self.patch).float()
        if self.norm_pix:
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        m = mask.unsqueeze(-1)
        g = h // self.patch

        def unpatchify(x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(b, g, w // self.patch, self.patch, self.patch, c)
            return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, h, w)

        return unpatchify(target * (1 - m)), unpatchify(target * (1 - m) + pred * m)


@register_method("mae")
def build_mae(cfg, backbone, feat_dim, mask_ratio: float = 0.75, norm_pix: bool = True, patch_size: int = 0,
              decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16, paper_init: bool = True):
    """Paper defaults: mask 75%, norm_pix_loss, decoder 512 wide, 8 blocks, 16 heads, fixed sin-cos
    position embeddings and xavier init (``paper_init``; false: timm's learned ones). ``patch_size`` > 0
    rebuilds the timm ViT with that patch size (e.g. 4 for 32-px CIFAR: 8x8 patches)."""
    current = getattr(getattr(backbone, "patch_embed", None), "patch_size", (None,))[0]
    if patch_size and current != patch_size:
        if cfg.views.crop_size % patch_size:
            raise ValueError(f"method.params.patch_size {patch_size} must divide views.crop_size {cfg.views.crop_size}")
        backbone = create_backbone(cfg.model.backbone, img_size=cfg.views.crop_size, patch_size=patch_size)
    return MAE(backbone, mask_ratio, norm_pix, decoder_dim, decoder_depth, decoder_heads, paper_init)


build_mae.family = MAE.family
build_mae.default_views = "mae"
