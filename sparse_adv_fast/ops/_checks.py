"""Argument checks shared by the ops: clear errors before any kernel launches."""

from __future__ import annotations

import torch
from torch import Tensor


def check_mask(mask: object, weight: Tensor, where: str = "mask") -> Tensor:
    """Validate a mask for ``weight``: a bool tensor of the same shape."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{where}: mask must be a torch.bool tensor, got {type(mask).__name__}")
    if mask.dtype is not torch.bool:
        raise TypeError(f"{where}: mask must be torch.bool, got {mask.dtype}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(
            f"{where}: mask shape {tuple(mask.shape)} does not match weight shape "
            f"{tuple(weight.shape)}"
        )
    return mask


def check_masked_weight(
    x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None, *, in_dim: int, w_in_dim: int, op: str,
    groups: int = 1,
) -> None:
    """Check shapes, dtypes and devices of ``x``, ``w``, ``mask`` and ``b`` for ``op``."""
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    check_mask(mask, w, op)
    if not x.is_floating_point() or not w.is_floating_point():
        raise TypeError(f"{op}: x and w must be floating point, got {x.dtype} and {w.dtype}")
    if x.dtype != w.dtype:
        raise TypeError(f"{op}: x dtype {x.dtype} differs from weight dtype {w.dtype}")
    expect = w.shape[w_in_dim] * groups
    if x.dim() < 1 or x.shape[in_dim] != expect:
        raise ValueError(
            f"{op}: input has {x.shape[in_dim] if x.dim() else 0} features/channels at dim "
            f"{in_dim}, weight expects {expect} (x {tuple(x.shape)}, "
            f"w {tuple(w.shape)})"
        )
    devs = {x.device, w.device, mask.device}
    if b is not None:
        if b.dtype != w.dtype:
            raise TypeError(f"{op}: bias dtype {b.dtype} differs from weight dtype {w.dtype}")
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{op}: bias shape {tuple(b.shape)} should be ({w.shape[0]},)")
        devs.add(b.device)
    if len(devs) > 1:
        raise ValueError(f"{op}: tensors on different devices: {sorted(map(str, devs))}")
