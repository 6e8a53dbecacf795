"""Pure loss functions, correct on one process; distributed gathering lives in the methods.

Each is a plain function of tensors with the paper's defaults as keyword arguments; one module per
family: contrastive, non-contrastive, clustering, distillation, masked image modelling.
"""

from .clustering import prototype_scores, sinkhorn, swav_loss
from .contrastive import infonce_loss, multiview_nt_xent_loss, nt_xent_loss
from .distillation import dino_loss, update_center
from .mim import ijepa_loss, mae_loss, multiblock_masks, num_masked, patchify, random_masking
from .non_contrastive import (
    barlow_twins_loss,
    covariance_loss,
    invariance_loss,
    local_vicreg_loss,
    multicrop_barlow_twins_loss,
    multicrop_cosine_loss,
    multicrop_pairs,
    multicrop_vicreg_loss,
    nearest_by_feature,
    nearest_by_location,
    negative_cosine_similarity,
    variance_loss,
    vicreg_loss,
)

__all__ = [
    "barlow_twins_loss",
    "covariance_loss",
    "dino_loss",
    "ijepa_loss",
    "infonce_loss",
    "invariance_loss",
    "local_vicreg_loss",
    "mae_loss",
    "multicrop_barlow_twins_loss",
    "multicrop_cosine_loss",
    "multicrop_pairs",
    "multicrop_vicreg_loss",
    "multiblock_masks",
    "multiview_nt_xent_loss",
    "nearest_by_feature",
    "nearest_by_location",
    "negative_cosine_similarity",
    "nt_xent_loss",
    "num_masked",
    "patchify",
    "random_masking",
    "prototype_scores",
    "sinkhorn",
    "swav_loss",
    "update_center",
    "variance_loss",
    "vicreg_loss",
]
