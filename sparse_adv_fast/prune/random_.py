"""Random unstructured pruning (the baseline every pruning method must beat)."""

from __future__ import annotations

import torch
from torch import nn

from ..nn import apply_masks
from ._select import check_scope, check_sparsity, masked_model, select


def random(
    model: nn.Module, sparsity: float, scope: str = "global",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Prune uniformly random alive weights of the masked layers until ``sparsity``.

    Same meaning of ``sparsity`` / ``scope`` and the same count rule as
    :func:`~sparse_adv_fast.prune.magnitude`; as ``torch.nn.utils.prune.RandomUnstructured``
    does, each alive weight draws a uniform score and the highest scores are pruned.
    ``generator`` (on the weights' device) makes the draw reproducible.
    """
    s = check_sparsity(sparsity, "random")
    check_scope(scope, "random")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"random: generator must be a torch.Generator, got {generator!r}")
    model, layers = masked_model(model, "random")
    scores = {}
    for n, m in layers.items():
        dev = generator.device if generator is not None else m.weight.device
        scores[n] = torch.rand(m.weight.shape, generator=generator, device=dev)
    current = {n: m.weight_mask for n, m in layers.items()}
    return apply_masks(model, select(scores, current, s, scope, "random", largest=True))
