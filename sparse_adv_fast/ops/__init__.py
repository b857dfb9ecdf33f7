"""Custom ops (``torch.library``, namespace ``saf``) with their pure-torch references."""

from .masked_conv2d import masked_conv2d
from .masked_linear import masked_linear
from .pgd_step import pgd_step, pgd_step_, random_start

__all__ = ["masked_conv2d", "masked_linear", "pgd_step", "pgd_step_", "random_start"]
