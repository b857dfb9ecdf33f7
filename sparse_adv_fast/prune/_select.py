"""Shared pieces of the pruning methods: argument checks and the count / tie rule.

The rule is the one of ``torch.nn.utils.prune``: a target of ``sparsity`` over ``n``
weights prunes ``round(sparsity * n)`` of them (Python's round, half to even), and the
weights to prune are chosen with ``torch.topk(score, k, largest=False)`` over the weights
still alive, in flattened order (concatenated in module order for global scope). Weights
already pruned stay pruned and count toward the target, so ``k`` new weights are chosen
among the alive ones with ``k = round(sparsity * n) - already_pruned``; this is exactly
what torch's ``PruningContainer`` does when it prunes an integer amount over an existing
mask, so masks are identical to torch's on the same weights, ties included.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from ..nn import masked_layers, sparsify
from ..nn.masked import _MaskedMixin

SCOPES = ("global", "layer")


def check_sparsity(sparsity: object, where: str) -> float:
    """``sparsity`` as a float in [0, 1), else a ValueError naming it."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(f"{where}: sparsity must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(f"{where}: sparsity must be in [0, 1), got {sparsity!r}")
    return s


def check_scope(scope: object, where: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"{where}: scope must be one of {SCOPES}, got {scope!r}")
    return scope  # type: ignore[return-value]


def masked_model(model: nn.Module, where: str) -> tuple[nn.Module, dict[str, _MaskedMixin]]:
    """``model`` with masked layers (sparsified in place when it has none) and its layers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(model).__name__}")
    if not masked_layers(model):
        model = sparsify(model)
    return model, masked_layers(model)


def _prune_lowest(score: Tensor, keep: Tensor, k: int, largest: bool) -> Tensor:
    """Flat bool ``keep`` with the ``k`` alive entries of lowest (or highest) score removed."""
    new = keep.clone()
    if k > 0:  # topk needs k >= 1
        alive = keep.nonzero().squeeze(1)
        idx = torch.topk(score[alive], k, largest=largest).indices
        new[alive[idx]] = False
    return new


def select(
    scores: dict[str, Tensor], current: dict[str, Tensor], sparsity: float, scope: str,
    where: str, largest: bool = False,
) -> dict[str, Tensor]:
    """New bool masks reaching ``sparsity`` by pruning the alive entries of lowest score.

    ``scores`` and ``current`` (bool masks) are keyed alike; nothing is mutated. With
    ``largest=True`` the highest scores are pruned (torch's random pruning convention).
    Raises ValueError when the target is below what is already pruned (pruned weights are
    never revived).
    """
    names = list(current)
    if scope == "layer":
        out = {}
        for n in names:
            keep = current[n].reshape(-1)
            k = round(sparsity * keep.numel())
            p = int((~keep).sum())
            if k < p:
                raise ValueError(
                    f"{where}: layer {n!r} already has {p} pruned weights, more than the "
                    f"{k} a sparsity of {sparsity} asks for; pruned weights are never revived"
                )
            out[n] = _prune_lowest(
                scores[n].detach().reshape(-1).to(keep.device), keep, k - p, largest
            ).view_as(current[n])
        return out
    keep = torch.cat([current[n].reshape(-1) for n in names])
    score = torch.cat([scores[n].detach().reshape(-1).to(keep.device) for n in names])
    k = round(sparsity * keep.numel())
    p = int((~keep).sum())
    if k < p:
        raise ValueError(
            f"{where}: the model already has {p} of {keep.numel()} weights pruned "
            f"(sparsity {p / keep.numel():.4f}), above the target {sparsity}; "
            "pruned weights are never revived"
        )
    flat = _prune_lowest(score, keep, k - p, largest)
    out, i = {}, 0
    for n in names:
        m = current[n]
        out[n] = flat[i : i + m.numel()].view_as(m).to(m.device)
        i += m.numel()
    return out
