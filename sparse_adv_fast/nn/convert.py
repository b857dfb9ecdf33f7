"""Model-level conversions and mask access: ``sparsify``, ``densify``, ``masks``, ...

Mask dictionaries are keyed by the qualified module name (as in ``named_modules()``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..ops._checks import check_mask
from .masked import MaskedConv2d, MaskedLinear, _MaskedMixin

_SWAPS: dict[type, type] = {nn.Linear: MaskedLinear, nn.Conv2d: MaskedConv2d}
Exclude = Iterable[str | type]


def masked_layers(model: nn.Module) -> dict[str, _MaskedMixin]:
    """Every masked layer of ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _MaskedMixin)}


def _excluded(name: str, module: nn.Module, exclude: Exclude) -> bool:
    for e in exclude:
        if isinstance(e, type):
            if isinstance(module, e):
                return True
        elif name == e or name.startswith(e + ".") or fnmatch.fnmatchcase(name, e):
            return True
    return False


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparsify(model: nn.Module, exclude: Exclude = ()) -> nn.Module:
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` for its masked twin, in place.

    Masks start all-ones; parameters are the same objects (optimizers keep working).
    ``exclude`` takes module names (exact, prefix or glob) and module types. Returns
    ``model`` (or the new layer when ``model`` itself is a Linear/Conv2d).
    """
    exclude = tuple(exclude)
    for e in exclude:
        if not isinstance(e, (str, type)):
            raise TypeError(f"sparsify: exclude items must be names or types, got {e!r}")
    todo = []
    for name, mod in model.named_modules():
        # Exact types only: subclasses such as attention's out_proj are read directly by
        # their parent, so a swap there would not mask anything.
        if type(mod) in _SWAPS and not _excluded(name, mod, exclude):
            todo.append((name, mod))
    if not todo and not masked_layers(model):
        raise ValueError(
            f"sparsify: {type(model).__name__} has no nn.Linear or nn.Conv2d layer to sparsify"
        )
    for name, mod in todo:
        new = _SWAPS[type(mod)].from_dense(mod)
        if name == "":
            return new
        _set_child(model, name, new)
    return model


def densify(model: nn.Module) -> nn.Module:
    """Swap every masked layer back to its torch layer (weights keep their zeros)."""
    for name, mod in list(masked_layers(model).items()):
        dense = mod.to_dense()
        if name == "":
            return dense
        _set_child(model, name, dense)
    return model


def masks(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every layer's bool mask, keyed by module name."""
    return {n: m.weight_mask.detach().clone() for n, m in masked_layers(model).items()}


def pack_masks(model: nn.Module, packed: bool = True) -> nn.Module:
    """Hold every masked layer's mask bit-packed (1 bit per weight; ``packed=False``: back to
    bool buffers). Returns ``model``. See ``MaskedLinear.pack_mask_``."""
    layers = masked_layers(model)
    if not layers:
        raise ValueError("pack_masks: the model has no masked layer; call sparsify(model) first")
    for m in layers.values():
        m.pack_mask_() if packed else m.unpack_mask_()
    return model


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """Set the masks named in ``masks`` (all checked before any is applied)."""
    layers = masked_layers(model)
    if not layers:
        raise ValueError("apply_masks: the model has no masked layer; call sparsify(model) first")
    unknown = sorted(set(masks) - set(layers))
    if unknown:
        raise ValueError(f"apply_masks: no masked layer named {unknown}; have {sorted(layers)}")
    for name, mask in masks.items():
        check_mask(mask, layers[name].weight, f"apply_masks[{name!r}]")
    for name, mask in masks.items():
        layers[name].set_mask(mask)
    return model


def _counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        n: (int((~m.weight_mask).sum()), m.weight_mask.numel())
        for n, m in masked_layers(model).items()
    }


def sparsity(model: nn.Module) -> float:
    """Fraction of masked-layer weights that are pruned (biases are never pruned)."""
    c = _counts(model)
    if not c:
        raise ValueError("sparsity: the model has no masked layer; call sparsify(model) first")
    return sum(z for z, _ in c.values()) / sum(t for _, t in c.values())


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of pruned weights per masked layer."""
    return {n: z / t for n, (z, t) in _counts(model).items()}


@torch.no_grad()
def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over all Linear/Conv2d layers (masked or not)."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    if total == 0:
        raise ValueError("weight_sparsity: the model has no nn.Linear or nn.Conv2d layer")
    return zeros / total
