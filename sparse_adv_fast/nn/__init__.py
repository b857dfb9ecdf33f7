"""Drop-in modules: masked layers, input normalisation and model conversions."""

from .convert import (
    apply_masks,
    densify,
    layer_sparsity,
    masked_layers,
    masks,
    pack_masks,
    sparsify,
    sparsity,
    weight_sparsity,
)
from .masked import MaskedConv2d, MaskedLinear
from .normalize import Normalize

__all__ = [
    "MaskedConv2d",
    "MaskedLinear",
    "Normalize",
    "apply_masks",
    "densify",
    "layer_sparsity",
    "masked_layers",
    "masks",
    "pack_masks",
    "sparsify",
    "sparsity",
    "weight_sparsity",
]
