"""Pure loss functions, correct on one process; distributed gathering lives in the methods.

Each is a plain function of tensors with the paper's defaults as keyword arguments.
"""

from .contrastive import nt_xent_loss

__all__ = ["nt_xent_loss"]
