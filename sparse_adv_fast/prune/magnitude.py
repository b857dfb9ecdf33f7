"""Magnitude (L1) pruning: drop the weights of smallest |w|, globally or per layer."""

from __future__ import annotations

from torch import nn

from ..nn import apply_masks
from ._select import check_scope, check_sparsity, masked_model, select


def magnitude(model: nn.Module, sparsity: float, scope: str = "global") -> nn.Module:
    """Prune the lowest-|w| weights of every masked layer until ``sparsity`` is reached.

    ``sparsity`` is the final fraction of pruned weights (biases are never pruned), over
    all masked layers (``scope="global"``) or in each layer (``scope="layer"``); weights
    already pruned stay pruned and count toward it. The count and tie rule are those of
    ``torch.nn.utils.prune`` (see ``prune._select``): global masks are identical to
    ``prune.global_unstructured(..., pruning_method=prune.L1Unstructured)`` and layer masks
    to ``prune.l1_unstructured`` on the same weights. A model without masked layers is
    sparsified in place first. Returns the model (a new layer when ``model`` itself was a
    plain Linear/Conv2d). Nothing changes when an argument is rejected.
    """
    s = check_sparsity(sparsity, "magnitude")
    check_scope(scope, "magnitude")
    model, layers = masked_model(model, "magnitude")
    scores = {n: m.weight.detach().abs() for n, m in layers.items()}
    current = {n: m.weight_mask for n, m in layers.items()}
    return apply_masks(model, select(scores, current, s, scope, "magnitude"))
