"""Conversion to and from ``torch.nn.utils.prune``'s reparametrisation.

torch keeps ``weight_orig`` (a Parameter), a float ``weight_mask`` buffer and a forward
pre-hook that recomputes ``weight``; sparse-adv-fast keeps ``weight`` and a bool
``weight_mask`` on a masked layer. These functions move a model between the two, keeping
the masks and the function computed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from ..nn import MaskedConv2d, MaskedLinear, masked_layers
from ..nn.convert import _set_child

_MASKED_FOR: dict[type, type] = {nn.Linear: MaskedLinear, nn.Conv2d: MaskedConv2d}


def _pruned_names(module: nn.Module) -> list[str]:
    """Names of the tensors torch's pruning reparametrises on ``module`` (via its hooks)."""
    names = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, tprune.BasePruningMethod):
            names.append(hook._tensor_name)
    return names


def to_torch_prune(model: nn.Module) -> nn.Module:
    """Turn every masked layer into a plain layer pruned by ``prune.custom_from_mask``.

    The layer gets ``weight_orig`` (the same Parameter object), a float ``weight_mask`` and
    torch's pre-hook. Returns ``model`` (the new layer when ``model`` itself is masked).
    """
    layers = masked_layers(model)
    if not layers:
        raise ValueError("to_torch_prune: the model has no masked layer")
    for name, layer in list(layers.items()):
        mask = layer.weight_mask.detach().clone()
        dense = layer.to_dense()
        tprune.custom_from_mask(dense, "weight", mask)
        if name == "":
            return dense
        _set_child(model, name, dense)
    return model


def from_torch_prune(model: nn.Module) -> nn.Module:
    """Turn every ``nn.Linear`` / ``nn.Conv2d`` pruned by torch into a masked layer.

    A torch-pruned layer is found by its pruning pre-hook on ``weight``; the masked layer
    gets ``weight = weight_orig * mask`` and the bool mask, and torch's hook, ``weight_orig``
    and float mask are removed. Layers of other types are left as they are. A pruned bias
    has no masked-layer equivalent: it raises a ValueError (before any change).
    """
    todo = []
    for name, mod in model.named_modules():
        pruned = _pruned_names(mod)
        if not pruned:
            continue
        if type(mod) not in _MASKED_FOR or "weight" not in pruned:
            continue
        extra = sorted(set(pruned) - {"weight"})
        if extra:
            raise ValueError(
                f"from_torch_prune: layer {name!r} also prunes {extra}; only weight masks "
                "convert to masked layers (call prune.remove on those first)"
            )
        todo.append((name, mod))
    if not todo:
        raise ValueError("from_torch_prune: no torch-pruned nn.Linear / nn.Conv2d weight found")
    for name, mod in todo:
        mask = mod.weight_mask.detach() != 0
        tprune.remove(mod, "weight")  # weight := weight_orig * mask, as a plain Parameter
        new = _MASKED_FOR[type(mod)].from_dense(mod, mask.to(torch.bool))
        if name == "":
            return new
        _set_child(model, name, new)
    return model
