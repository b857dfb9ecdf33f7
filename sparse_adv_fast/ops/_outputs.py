"""Custom-op outputs must not be views: autograd would then forbid in-place use of them
(``nn.ReLU(inplace=True)`` right after a masked layer)."""

from __future__ import annotations

import torch
from torch import Tensor


def fresh(t: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """``t`` (reshaped to ``shape``) as a tensor that is not a view, copying only if needed."""
    if shape is not None and tuple(t.shape) != tuple(shape):
        t = t.reshape(shape)
    if t._base is None:
        return t
    if t.is_contiguous():
        # Same storage, no view bookkeeping: what aten's own matmul does for its reshapes.
        return torch.ops.aten._unsafe_view(t, t.shape)
    return t.clone()
