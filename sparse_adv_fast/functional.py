"""``torch.nn.functional``-style API over the ops, with autocast handled.

Custom ops are opaque to autocast, so the cast that ``F.linear`` / ``F.conv2d`` would get
is applied here: under an active autocast region the floating inputs are cast to the
region's dtype before the op runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import masked_conv2d as _masked_conv2d
from .ops import masked_conv2d_relu as _masked_conv2d_relu
from .ops import masked_linear as _masked_linear
from .ops import pgd_step, pgd_step_, random_start


def _autocast(*ts: Tensor | None) -> tuple[Tensor | None, ...]:
    dev = ts[0].device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return ts
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in ts)


def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight * mask, bias)`` on the fastest available backend."""
    x, weight, bias = _autocast(x, weight, bias)
    return _masked_linear(x, weight, mask, bias)


def masked_conv2d(
    x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None, stride=1, padding=0,
    dilation=1, groups: int = 1, *, relu: bool = False,
) -> Tensor:
    """``F.conv2d(x, weight * mask, bias, ...)`` on the fastest available backend; with
    ``relu``, ``F.relu`` of it, fused into the kernels inside attacks where they allow."""
    x, weight, bias = _autocast(x, weight, bias)
    op = _masked_conv2d_relu if relu else _masked_conv2d
    return op(x, weight, mask, bias, stride, padding, dilation, groups)


__all__ = ["masked_conv2d", "masked_linear", "pgd_step", "pgd_step_", "random_start"]
