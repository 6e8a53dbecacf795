"""The model and optimizer of ``sslray.raytrain.finetune``: a backbone + linear head (``Classifier``),
trained whole or, frozen, the head alone; stochastic depth rebuilt around loaded weights; AdamW or
SGD over parameter groups with ViT layer-wise lr decay (BEiT / MAE fine-tuning)."""

from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("adamw", "sgd")


class Classifier(nn.Module):
    """The backbone, every parameter of it trained, and a linear head; with ``freeze_backbone`` the
    head alone (the backbone gets no gradient and stays in eval mode whatever ``train()`` is told).

    Pretraining keeps some backbone tensors frozen on purpose (MoCo v3's random patch projection and
    fixed sin-cos position embedding, MAE's fixed position embedding); the method builder that loads
    the checkpoint freezes them again. Fine-tuning trains them all from their pretrained values, as
    MAE's and MoCo v3's fine-tuning recipes do (the position embedding included), so the freezing is
    undone here, for the pretrained and the random-init backbone alike."""

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int, freeze_backbone: bool = False):
        super().__init__()
        self.frozen = bool(freeze_backbone)
        self.backbone = backbone.requires_grad_(not self.frozen)
        self.head = nn.Linear(feat_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # small head init, as MAE's fine-tuning
        nn.init.zeros_(self.head.bias)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.frozen:  # BatchNorm in eval mode: the running statistics are the pretrained ones, and stay so
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():  # no activations kept for a backward that never reaches the backbone
                feats = self.backbone(x)
            return self.head(feats)
        return self.head(self.backbone(x))


def with_drop_path(backbone: nn.Module, cfg, rate: float) -> nn.Module:
    """``backbone`` rebuilt with timm's stochastic depth (``drop_path_rate=rate``) and its weights loaded
    back strictly: drop path holds no tensors, so the state_dict is the same. 0 returns it as it is."""
    if not rate:
        return backbone
    from ..export import timm_kwargs
    from .backbones import create_backbone

    try:
        new = create_backbone(cfg.model.backbone, cifar_stem_=bool(cfg.model.cifar_stem), drop_path_rate=float(rate),
                              **timm_kwargs(backbone, cfg))
        new.load_state_dict(backbone.state_dict(), strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"--ft-drop-path (finetune drop_path): backbone {cfg.model.backbone!r} cannot be rebuilt "
                         f"with drop_path_rate={rate} around the checkpoint's weights ({e})") from None
    return new


def make_optimizer(net: Classifier, s, lr: float) -> torch.optim.Optimizer:
    """``s.optimizer`` (a ``FinetuneSettings``) over the parameters that train, in ``layer_decay_groups``
    with ``s.weight_decay`` and ``s.layer_decay``; ``lr``: the peak lr, which the loop schedules."""
    groups = layer_decay_groups(net, s.weight_decay, s.layer_decay)
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    raise ValueError(f"finetune optimizer {s.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")


def is_vit(backbone: nn.Module) -> bool:
    return hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed")


def vit_layer_id(name: str, num_blocks: int) -> int:
    """0 for the embeddings, i + 1 for ``blocks.i``, ``num_blocks + 1`` for the final norm (and head)."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def layer_decay_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW param groups with an ``lr_scale`` each: layer-wise decay on ViTs, 1 elsewhere; no weight
    decay on biases, norms and tokens."""
    bb = model.backbone
    vit = is_vit(bb) and layer_decay < 1.0
    n = len(bb.blocks) if vit else 0
    groups: dict[tuple[int, bool], dict] = {}
    for full, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = full[len("backbone."):] if full.startswith("backbone.") else None
        lid = (vit_layer_id(name, n) if vit and name is not None else n + 1)
        no_wd = p.ndim <= 1 or full.endswith(".bias") or (name or "") in ("cls_token", "pos_embed", "reg_token")
        g = groups.setdefault((lid, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                             "lr_scale": layer_decay ** (n + 1 - lid) if vit else 1.0,
                                             "layer_id": lid})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]
