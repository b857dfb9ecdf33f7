"""``masked_linear``: ``y = x (W ⊙ M)^T + b`` as a torch custom op.

Backend contract (every backend exposes these three functions, 2-D contiguous inputs):

* ``forward(x2d, w, mask, b) -> y2d``
* ``grad_input(gy2d, w, mask) -> gx2d``          (uses ``W ⊙ M``)
* ``grad_weight(gy2d, x2d, mask) -> gw``         (``(gy^T x) ⊙ M``: exact zeros where pruned)

The functions below with those names are the pure-torch reference: the CPU fallback and
the test oracle. Autograd asks only for the grads that are needed, so an attack (which
needs ``grad_x`` alone) never computes a weight gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from . import _cache, _direct
from ._checks import check_masked_weight
from ._outputs import fresh

OP = "masked_linear"


# ---- pure-torch reference (the ``torch`` backend) ---------------------------------------
def forward(x2d: Tensor, w: Tensor, mask: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(x2d, _cache.masked_weight(w, mask), b)


def grad_input(gy2d: Tensor, w: Tensor, mask: Tensor) -> Tensor:
    return gy2d @ _cache.masked_weight(w, mask)


def grad_weight(gy2d: Tensor, x2d: Tensor, mask: Tensor) -> Tensor:
    # Zeroed in place: ``* mask`` would convert the bool mask to a float copy and write a
    # second weight-sized tensor, a fifth of a 2048x2048 training step.
    gw = gy2d.t() @ x2d
    _cache.zero_pruned_(gw, mask)
    return gw


def reference(x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None = None) -> Tensor:
    """Plain autograd-able torch formula, independent of every backend (test oracle)."""
    return F.linear(x, w * mask, b)


# ---- dispatch -------------------------------------------------------------------------
class _Ref:
    forward = staticmethod(forward)
    grad_input = staticmethod(grad_input)
    grad_weight = staticmethod(grad_weight)


_REF = _Ref()


def _describe(direction: str, args: tuple) -> backends.Call:
    """What ``auto`` keys a call on: (rows, in, out), mask, weight (``grad_weight`` reads
    none) and dtype.

    Every direction's first argument is the 2-D activation (``x2d`` or ``gy2d``) whose rows
    are the batch; the mask gives (out, in). The functions are pure, so timing reuses args.
    """
    mask = args[2]
    w = None if direction == "grad_weight" else args[1]
    return backends.Call((args[0].shape[0], mask.shape[1], mask.shape[0]), args[0].dtype,
                         mask, w)


def _impl(device: torch.device):
    """The backend namespace for ``device``; in ``auto`` mode its functions pick per call
    by (direction, shape, density bucket, dtype) through the registry."""
    return backends.impl(OP, device, _REF, _describe)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


@torch.library.custom_op("saf::masked_linear", mutates_args=())
def _op(x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None) -> Tensor:
    y = _impl(x.device).forward(_flat(x), w, mask, b)
    return fresh(y, (*x.shape[:-1], w.shape[0]))


@_op.register_fake
def _(x, w, mask, b):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("saf::masked_linear_grad_input", mutates_args=())
def _grad_input_op(gy: Tensor, w: Tensor, mask: Tensor) -> Tensor:
    gx = _impl(gy.device).grad_input(_flat(gy), w, mask)
    return fresh(gx, (*gy.shape[:-1], w.shape[1]))


@_grad_input_op.register_fake
def _(gy, w, mask):
    return gy.new_empty((*gy.shape[:-1], w.shape[1]))


@torch.library.custom_op("saf::masked_linear_grad_weight", mutates_args=())
def _grad_weight_op(gy: Tensor, x: Tensor, mask: Tensor) -> Tensor:
    return fresh(_impl(gy.device).grad_weight(_flat(gy), _flat(x), mask))


@_grad_weight_op.register_fake
def _(gy, x, mask):
    return x.new_empty(mask.shape)


def _setup_context(ctx, inputs, output):
    x, w, mask, b = inputs
    ctx.save_for_backward(x, w, mask)
    ctx.has_bias = b is not None


def _backward(ctx, gy):
    x, w, mask = ctx.saved_tensors
    need_x, need_w, _, need_b = ctx.needs_input_grad
    gx = _grad_input_op(gy, w, mask) if need_x else None
    gw = _grad_weight_op(gy, x, mask) if need_w else None
    gb = gy.reshape(-1, gy.shape[-1]).sum(0) if (need_b and ctx.has_bias) else None
    return gx, gw, None, gb


_op.register_autograd(_backward, setup_context=_setup_context)


def masked_linear(x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None = None) -> Tensor:
    """``x (w ⊙ mask)^T + b`` with a bool ``mask`` of ``w``'s shape.

    Runs on the backend chosen by :mod:`sparse_adv_fast.backends`; gradients flow to
    ``x``, ``w`` and ``b`` (``grad_w`` is exactly zero where ``mask`` is False).
    """
    check_masked_weight(x, w, mask, b, in_dim=-1, w_in_dim=1, op=OP)
    # 2-D inputs only: the backends take the flattened rows, as the custom op passes them.
    if x.dim() == 2 and _direct.frozen_weights(w, b):
        x2d = x.contiguous()
        y = _direct.run(_impl(x.device), _REF, (x2d, w, mask, b), (x2d, w, mask))
        if y is not None:
            return y
    return _op(x, w, mask, b)
