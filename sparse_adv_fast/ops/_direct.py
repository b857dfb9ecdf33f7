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


def run(ns: object, reference: object, forward_args: tuple, grad_input_args: tuple,
        relu: bool = False) -> Tensor | None:
    """The op's output (``relu`` of it with ``relu``) through the implementations ``ns``
    already runs for this call, without the custom op; None while a choice is still to be
    made (then the custom op runs and makes it).

    ``forward_args[0]`` is the input; ``grad_input_args`` holds a placeholder where the
    output gradient goes. When both directions are the torch reference, the plain torch op
    runs under aten's autograd; otherwise a small autograd function calls the picked
    forward and input-gradient functions directly. With ``relu``, implementations that
    offer ``forward_relu`` / ``grad_input_relu`` beside ``forward`` / ``grad_input`` (the
    sparse kernels: they clamp as they store and gate the output gradient as they read it)
    run the ReLU fused; where only the input gradient's pick offers it, the ReLU runs in
    place after the forward and its backward in the gated input gradient; any other pick
    is followed by ``torch.relu``.
    """
    x = forward_args[0]
    calls = [("forward", forward_args)]
    if x.requires_grad:
        calls.append(("grad_input", grad_input_args))
    fns = backends.remembered(ns, calls)
    if fns is None:
        return None
    if relu:
        fused = [getattr(getattr(f, "__self__", None), f"{d}_relu", None)
                 for f, (d, _) in zip(fns, calls, strict=True)]
        if all(f is not None for f in fused):
            return _through(fused, forward_args, grad_input_args, gated=True)
        if len(fused) == 2 and fused[1] is not None:
            # Only the input gradient's pick fuses (an RGB stem: oneDNN's forward, the
            # direct input gradient): the ReLU runs in place on the forward's fresh output
            # and its backward in the gated kernel, so no threshold_backward pass is left.
            return _Frozen.apply(x, _relu_after(fns[0]), fused[1], forward_args,
                                 grad_input_args[1:], True)
    if all(f is getattr(reference, d) for f, (d, _) in zip(fns, calls, strict=True)):
        y = reference.forward(*forward_args)  # type: ignore[attr-defined]
    else:
        y = _through(fns, forward_args, grad_input_args, gated=False)
    return torch.relu(y) if relu else y


def _relu_after(fn):
    def forward_relu(*args):
        return fresh(fn(*args)).relu_()

    return forward_relu


def _through(fns: list, forward_args: tuple, grad_input_args: tuple, gated: bool) -> Tensor:
    """The forward by ``fns[0]``; its input gradient, if one is taken, by ``fns[1]``."""
    if len(fns) == 1:
        return fresh(fns[0](*forward_args))
    return _Frozen.apply(forward_args[0], fns[0], fns[1], forward_args, grad_input_args[1:],
                         gated)


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
