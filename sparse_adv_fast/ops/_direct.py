"""When a masked op may run as the plain torch op on its masked weight, skipping the
custom op.

Inside an attack (the weights frozen, :func:`~sparse_adv_fast.ops._cache.frozen` scope) an
op whose forward and input gradient both go to the torch reference computes exactly
``F.conv2d`` / ``F.linear`` on the cached masked weight, and aten's own autograd gives the
same input gradient with the same kernel. Going through the custom op then only adds its
per-call cost: two Python-level custom ops a layer a step, about a fifth of a PGD step of
a sparse ResNet-18 on CPU. The dispatch choice is only read here, never made: the first
call of a shape goes through the op, which measures and remembers it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from . import _cache


def frozen_weights(w: Tensor, b: Tensor | None) -> bool:
    """Whether ``w`` (and ``b``) take no gradient and sit in an attack's frozen scope."""
    return (not w.requires_grad and (b is None or not b.requires_grad)
            and _cache.is_frozen(w) and not torch.compiler.is_compiling())


def reference_path(ns: object, reference: object, x: Tensor,
                   forward_args: tuple, grad_input_args: tuple) -> bool:
    """Whether ``ns`` runs ``reference`` for the forward and, when ``x`` takes a gradient,
    for the input gradient of this call."""
    calls = [("forward", forward_args)]
    if x.requires_grad:
        calls.append(("grad_input", grad_input_args))
    return backends.reference_picked(ns, reference, calls)
