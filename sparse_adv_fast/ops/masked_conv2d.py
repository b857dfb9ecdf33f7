"""``masked_conv2d``: ``conv2d(x, W ⊙ M, b)`` as a torch custom op.

Backend contract (every backend exposes these three functions; ``conv`` is the tuple
``(stride, padding, dilation, groups)`` with 2-element lists):

* ``forward(x, w, mask, b, conv) -> y``
* ``grad_input(gy, x, w, mask, conv) -> gx``      (uses ``W ⊙ M``; ``x`` gives the shape)
* ``grad_weight(gy, x, mask, conv) -> gw``        (exact zeros where pruned)

The functions below with those names are the pure-torch reference (CPU fallback, oracle).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from . import _cache, _direct
from ._checks import check_masked_weight
from ._outputs import fresh

OP = "masked_conv2d"
Conv = tuple[list[int], list[int], list[int], int]


# ---- pure-torch reference (the ``torch`` backend) ---------------------------------------
def forward(x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None, conv: Conv) -> Tensor:
    stride, padding, dilation, groups = conv
    return F.conv2d(x, _cache.masked_weight(w, mask), b, stride, padding, dilation, groups)


def _conv_backward(gy, x, w, conv, mask_out):
    stride, padding, dilation, groups = conv
    return torch.ops.aten.convolution_backward(
        gy, x, w, None, stride, padding, dilation, False, [0, 0], groups, mask_out
    )


def grad_input(gy: Tensor, x: Tensor, w: Tensor, mask: Tensor, conv: Conv) -> Tensor:
    return _conv_backward(gy, x, _cache.masked_weight(w, mask), conv, [True, False, False])[0]


def grad_weight(gy: Tensor, x: Tensor, mask: Tensor, conv: Conv) -> Tensor:
    w_like = x.new_empty(mask.shape)  # only its shape is read
    gw = _conv_backward(gy, x, w_like, conv, [False, True, False])[1]
    _cache.zero_pruned_(gw, mask)  # in place, as for masked_linear
    return gw


def reference(
    x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None = None, stride=1, padding=0,
    dilation=1, groups: int = 1,
) -> Tensor:
    """Plain autograd-able torch formula, independent of every backend (test oracle)."""
    return F.conv2d(x, w * mask, b, stride, padding, dilation, groups)


# ---- dispatch -------------------------------------------------------------------------
class _Ref:
    forward = staticmethod(forward)
    grad_input = staticmethod(grad_input)
    grad_weight = staticmethod(grad_weight)


_REF = _Ref()


def _describe(direction: str, args: tuple) -> backends.Call:
    """What ``auto`` keys a call on: the input's (N, C, H, W), the weight shape, the conv
    settings, mask, weight (``grad_weight`` reads none) and dtype. The functions are pure,
    so timing reuses args."""
    if direction == "forward":  # forward(x, w, mask, b, conv)
        x, w, mask, conv = args[0], args[1], args[2], args[4]
    elif direction == "grad_input":  # grad_input(gy, x, w, mask, conv)
        x, w, mask, conv = args[1], args[2], args[3], args[4]
    else:  # grad_weight(gy, x, mask, conv)
        x, w, mask, conv = args[1], None, args[2], args[3]
    stride, padding, dilation, groups = conv
    shape = (*x.shape, "w" + "x".join(map(str, mask.shape)), f"s{stride[0]},{stride[1]}",
             f"p{padding[0]},{padding[1]}", f"d{dilation[0]},{dilation[1]}", f"g{groups}")
    return backends.Call(shape, x.dtype, mask, w)


def _impl(device: torch.device):
    """The backend namespace for ``device``; in ``auto`` mode its functions pick per call
    by (direction, shape, density bucket, dtype) through the registry."""
    return backends.impl(OP, device, _REF, _describe)


def _out_hw(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.custom_op("saf::masked_conv2d", mutates_args=())
def _op(
    x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None, stride: list[int],
    padding: list[int], dilation: list[int], groups: int,
) -> Tensor:
    return fresh(_impl(x.device).forward(x, w, mask, b, (stride, padding, dilation, groups)))


@_op.register_fake
def _(x, w, mask, b, stride, padding, dilation, groups):
    h = _out_hw(x.shape[2], w.shape[2], stride[0], padding[0], dilation[0])
    wd = _out_hw(x.shape[3], w.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], w.shape[0], h, wd))


@torch.library.custom_op("saf::masked_conv2d_grad_input", mutates_args=())
def _grad_input_op(
    gy: Tensor, x: Tensor, w: Tensor, mask: Tensor, stride: list[int], padding: list[int],
    dilation: list[int], groups: int,
) -> Tensor:
    return fresh(_impl(gy.device).grad_input(gy, x, w, mask, (stride, padding, dilation, groups)))


@_grad_input_op.register_fake
def _(gy, x, w, mask, stride, padding, dilation, groups):
    return torch.empty_like(x)


@torch.library.custom_op("saf::masked_conv2d_grad_weight", mutates_args=())
def _grad_weight_op(
    gy: Tensor, x: Tensor, mask: Tensor, stride: list[int], padding: list[int],
    dilation: list[int], groups: int,
) -> Tensor:
    return fresh(_impl(gy.device).grad_weight(gy, x, mask, (stride, padding, dilation, groups)))


@_grad_weight_op.register_fake
def _(gy, x, mask, stride, padding, dilation, groups):
    return x.new_empty(mask.shape)


def _setup_context(ctx, inputs, output):
    x, w, mask, b, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, w, mask)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has_bias = b is not None


def _backward(ctx, gy):
    x, w, mask = ctx.saved_tensors
    need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
    gx = _grad_input_op(gy, x, w, mask, *ctx.conv) if need_x else None
    gw = _grad_weight_op(gy, x, mask, *ctx.conv) if need_w else None
    gb = gy.sum((0, 2, 3)) if (need_b and ctx.has_bias) else None
    return gx, gw, None, gb, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def _pair(v: int | tuple[int, ...] | list[int], name: str) -> list[int]:
    out = [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]
    if len(out) != 2:
        raise ValueError(f"masked_conv2d: {name} must be an int or a pair, got {v!r}")
    return out


def _checked(x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None, stride, padding, dilation,
             groups: int) -> Conv:
    if x.dim() != 4:
        raise ValueError(f"masked_conv2d: x must be 4-D (N, C, H, W), got {tuple(x.shape)}")
    if isinstance(padding, str):
        raise ValueError("masked_conv2d: string padding is not supported; pass ints")
    check_masked_weight(x, w, mask, b, in_dim=1, w_in_dim=1, op=OP, groups=groups)
    return (_pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"),
            int(groups))


def masked_conv2d_relu(
    x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None = None, stride=1, padding=0,
    dilation=1, groups: int = 1,
) -> Tensor:
    """``relu(masked_conv2d(...))``. In an attack's frozen scope, where the sparse kernels
    run this convolution, the ReLU is fused into them (clamped as the output is stored,
    the output gradient gated as it is read); elsewhere it is the two ops."""
    conv = _checked(x, w, mask, b, stride, padding, dilation, groups)
    if _direct.frozen_weights(w, b):
        y = _direct.run(_impl(x.device), _REF, (x, w, mask, b, conv), (None, x, w, mask, conv),
                        relu=True)
        if y is not None:
            return y
    return torch.relu(_op(x, w, mask, b, *conv))


def masked_conv2d(
    x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None = None, stride=1, padding=0,
    dilation=1, groups: int = 1,
) -> Tensor:
    """``conv2d(x, w ⊙ mask, b, stride, padding, dilation, groups)``, bool ``mask``.

    ``padding`` takes ints or pairs (not the string forms). Gradients flow to ``x``,
    ``w`` and ``b``; ``grad_w`` is exactly zero where ``mask`` is False.
    """
    conv = _checked(x, w, mask, b, stride, padding, dilation, groups)
    if _direct.frozen_weights(w, b):
        y = _direct.run(_impl(x.device), _REF, (x, w, mask, b, conv), (None, x, w, mask, conv))
        if y is not None:
            return y
    return _op(x, w, mask, b, *conv)
