"""Augmentation-policy ops for method x augmentation studies, applied inside ``ViewAugment``.

Each op takes a float batch (B, C, H, W) in [0, 1] on any device and returns one of the same shape,
drawing its random parameters per sample on the batch's device (``torch.rand(..., device=x.device)``),
so it follows the global torch seed like the rest of the view pipeline.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..registry import Registry

POLICIES: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("augmentation policy op")
