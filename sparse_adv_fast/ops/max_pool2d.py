"""Window max pool for the attack path: ``F.max_pool2d`` where the windows tile the input
(kernel = stride, no padding, dilation 1, floor mode: VGG's and most small CNNs' 2x2
pools), on CPU kernels that match aten exactly.

aten's NCHW CPU pool is slow (about 1.1 ms for the forward of a 32x16x32x32 batch on a
2-core VM) and its backward zero-fills the input gradient and then scatters into it. Here
the forward stores each window's pick as a byte, and the backward writes every input
gradient element once (0.04 ms and 0.08 ms there). A window's pick is aten's: the first
maximum in row-major order, a NaN over anything, a later NaN over an earlier one, so
values and gradients are those of ``F.max_pool2d`` bit for bit. Anything else (another
device or dtype, overlapping or padded windows, no C++ compiler, the torch backend
forced, a ``torch.compile`` trace) returns None and the caller runs aten.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from .. import backends

_log = logging.getLogger("sparse_adv_fast")
MAX_KERNEL = 16  # picks are stored as a byte: k * k <= 256


@functools.cache
def _ext() -> ModuleType | None:
    from ..backends import _build

    try:
        return _build.load("max_pool2d", "cpp")
    except Exception as e:  # noqa: BLE001 - no compiler, failed build: aten runs instead
        _log.info("sparse_adv_fast: max_pool2d runs on aten: %s", e)
        return None


def tiling_kernel(x: Tensor, kernel, stride, padding, dilation, ceil_mode: bool) -> int | None:
    """The window size ``k`` when these pool settings on ``x`` run on the CPU kernels here,
    else None."""
    k, s = _pair(kernel), _pair(stride if stride is not None and stride != [] else kernel)
    if not (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.dim() == 4 and x.is_contiguous() and len(k) == 2 and k[0] == k[1]
            and s == k and _pair(padding) == (0, 0) and _pair(dilation) == (1, 1)
            and not ceil_mode and 1 <= k[0] <= MAX_KERNEL
            and x.shape[2] >= k[0] and x.shape[3] >= k[0]):
        return None
    if backends.current() == "torch" or torch.compiler.is_compiling() or _ext() is None:
        return None
    return k[0]


class WindowMaxPool(torch.autograd.Function):
    """``F.max_pool2d(x, k)`` on the CPU kernels; ``k`` from :func:`tiling_kernel`."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int) -> Tensor:
        y, idx = _ext().forward(x, k)
        ctx.save_for_backward(idx)
        ctx.hwk = (x.shape[2], x.shape[3], k)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor):
        (idx,) = ctx.saved_tensors
        return _ext().backward(gy.contiguous(), idx, *ctx.hwk), None


__all__ = ["MAX_KERNEL", "WindowMaxPool", "tiling_kernel"]
