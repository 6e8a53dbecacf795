"""Projection / prediction heads: one generic MLP, methods only choose sizes."""

from __future__ import annotations

from torch import nn


class MLPHead(nn.Module):
    """``in -> [Linear -> BN -> ReLU] x (layers-1) -> Linear (-> BN if last_bn)``. The last Linear has a
    bias unless a BN follows it, or ``last_bias=False`` (MoCo v3's heads have no bias anywhere)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, last_bn: bool = False,
                 last_bias: bool | None = None):
        super().__init__()
        blocks: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            d = hidden_dim
        blocks.append(nn.Linear(d, out_dim, bias=(not last_bn) if last_bias is None else last_bias))
        if last_bn:
            blocks.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*blocks)

    def forward(self, x):
        return self.net(x)
