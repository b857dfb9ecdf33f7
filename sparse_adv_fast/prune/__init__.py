"""Pruning: magnitude, random, IMP with rewinding (lottery tickets), HYDRA scores, and
conversion to and from ``torch.nn.utils.prune``.

Every method computes bool masks and applies them to the model's masked layers
(``saf.apply_masks``); ``sparsity`` is always the final fraction of pruned weights, with
``torch.nn.utils.prune``'s count and tie rule (see ``_select``).
"""

from .hydra import hydra
from .imp import Ticket, imp
from .magnitude import magnitude
from .random_ import random
from .torch_prune import from_torch_prune, to_torch_prune

__all__ = [
    "Ticket",
    "from_torch_prune",
    "hydra",
    "imp",
    "magnitude",
    "random",
    "to_torch_prune",
]
