"""When a masked op may skip its custom op: inside an attack.

Inside an attack (the weights frozen, :func:`~sparse_adv_fast.ops._cache.frozen` scope) no
weight gradient is taken, so the op is just its forward and input gradient. An op whose
two directions both go to the torch reference computes exactly ``F.conv2d`` /
``F.linear`` on the cached masked weight, and aten's own autograd gives the same input
gradient with the same kernel; an op on any other implementation (the sparse kernels)
calls the same two functions the custom op would, from a small autograd function. Going
through the custom op only adds its per-call cost: two Python-level custom ops a layer a
step, about 0.45 ms, a fifth of a PGD step of a sparse ResNet-18 on CPU. The dispatch
choice is only read here, never made: the first call of a shape goes through the op,
which measures and remembers it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import backends
from . import _cache
from ._outputs import fresh


def frozen_weights(w: Tensor, b: Tensor | None) -> bool:
    """Whether ``w`` (and ``b``) take no gradient and sit in an attack's frozen scope."""
    return (not w.requires_grad and (b is None or not b.requires_grad)
            and _cache.is_frozen(w) and not torch.compiler.is_compiling())


def _picked(ns: object, forward_args: tuple,
            grad_input_args: tuple) -> tuple[list, list] | None:
    """The implementations ``ns`` already runs for this call's forward (and input gradient,
    when the input takes one) with the calls they serve; None while a choice is to be made."""
    calls = [("forward", forward_args)]
    if forward_args[0].requires_grad:
        calls.append(("grad_input", grad_input_args))
    fns = backends.remembered(ns, calls)
    return None if fns is None else (fns, calls)


def run(ns: object, reference: object, forward_args: tuple,
        grad_input_args: tuple) -> Tensor | None:
    """The op's output through the implementations ``ns`` already runs for this call,
    without the custom op; None while a choice is still to be made (then the custom op runs
    and makes it).

    ``forward_args[0]`` is the input; ``grad_input_args`` holds a placeholder where the
    output gradient goes. When both directions are the torch reference, the plain torch op
    runs under aten's autograd; otherwise a small autograd function calls the picked
    forward and input-gradient functions directly.
    """
    picked = _picked(ns, forward_args, grad_input_args)
    if picked is None:
        return None
    fns, calls = picked
    if all(f is getattr(reference, d) for f, (d, _) in zip(fns, calls, strict=True)):
        return reference.forward(*forward_args)  # type: ignore[attr-defined]
    if len(fns) == 1:
        return fresh(fns[0](*forward_args))
    return _Frozen.apply(forward_args[0], fns[0], fns[1], forward_args, grad_input_args[1:],
                         False)


def run_relu(ns: object, forward_args: tuple, grad_input_args: tuple) -> Tensor | None:
    """``relu`` of the op's output, fused into the picked implementations where they offer
    it (``forward_relu`` / ``grad_input_relu`` next to ``forward`` / ``grad_input``: the
    sparse kernels clamp as they store and gate the output gradient as they read it); None
    where they do not, or while a choice is still to be made (the caller then applies the
    ReLU to the unfused op)."""
    picked = _picked(ns, forward_args, grad_input_args)
    if picked is None:
        return None
    fused = [getattr(getattr(f, "__self__", None), f"{d}_relu", None)
             for f, (d, _) in zip(*picked, strict=True)]
    if any(f is None for f in fused):
        return None
    if len(fused) == 1:
        return fresh(fused[0](*forward_args))
    return _Frozen.apply(forward_args[0], fused[0], fused[1], forward_args,
                         grad_input_args[1:], True)


class _Frozen(torch.autograd.Function):
    """Forward and input gradient of a masked op with frozen weights, by given functions.
    ``gated``: the functions fuse a ReLU after the op, and the input gradient also takes
    the saved output, which gates the output gradient as ReLU's own backward does."""

    @staticmethod
    def forward(ctx, x, forward_fn, grad_input_fn, forward_args, grad_input_rest, gated):
        ctx.grad_input_fn, ctx.rest, ctx.gated = grad_input_fn, grad_input_rest, gated
        y = fresh(forward_fn(*forward_args))
        if gated:
            ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        gate = ctx.saved_tensors if ctx.gated else ()
        gx = fresh(ctx.grad_input_fn(gy.contiguous(), *gate, *ctx.rest))
        return gx, None, None, None, None, None
