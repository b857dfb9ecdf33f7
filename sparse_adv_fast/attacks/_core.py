"""Pieces every attack shares: argument/batch preparation, the loss-and-gradient call, the
pure projection and the per-sample best-restart select (``ops.restart_select``).

Restarts are laid out restart-major: row ``r * B + b`` is restart ``r`` of sample ``b``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.restart_select import row_chunks, select_restarts
from . import _hygiene as H
from .losses import MIN_CLASSES, attack_loss
from .losses import fooled as fooled_mask


@dataclass
class Batch:
    """A validated batch, repeated over restarts (restart-major)."""

    x: Tensor  # [R*B, ...] clean inputs, contiguous
    y: Tensor  # [R*B] labels (targets when targeted)
    y_true: Tensor | None  # [R*B] clean predictions, only for targeted DLR
    restarts: int
    lo: float
    hi: float


def prepare(
    where: str, model: nn.Module, x: Tensor, y: Tensor, *, loss: str, targeted: bool,
    restarts: int, lo: float, hi: float, defer_labels: bool = False,
) -> Batch:
    """Check the batch (one fused pass) and repeat it over restarts. Call inside
    :func:`_hygiene.attack_mode`.

    The labels are checked against the model's outputs on a clean forward (no grad), which
    targeted DLR needs anyway for its true classes. With ``defer_labels`` the caller
    promises to pass :func:`check_logits` to the first :func:`loss_grad` over the whole
    batch instead, which saves that forward (the checks are once per attack either way).
    """
    H.check_batch(where, x, y, lo, hi)
    x = x.detach()
    y = y.to(device=x.device, dtype=torch.long)
    need_true = loss == "dlr" and targeted
    y_true = None
    if need_true or not defer_labels:
        with torch.no_grad():
            logits = model(x if need_true else x[:1])
        check_logits(where, logits, y, loss, targeted)
        y_true = logits.argmax(dim=1) if need_true else None
    reps = (restarts,) + (1,) * (x.dim() - 1)
    xr = x.repeat(reps).contiguous() if restarts > 1 else x.contiguous()
    yr = y.repeat(restarts)
    if y_true is not None:
        y_true = y_true.repeat(restarts)
    return Batch(xr, yr, y_true, restarts, lo, hi)


def check_logits(where: str, logits: Tensor, y: Tensor, loss: str, targeted: bool) -> None:
    """The model returns ``[B, classes]`` logits that the labels ``y`` index."""
    if logits.dim() != 2:
        raise ValueError(f"{where}: the model must return logits of shape [B, classes], got "
                         f"{tuple(logits.shape)}")
    H.check_labels(where, y, logits.shape[1], MIN_CLASSES[(loss, targeted)])


def loss_grad(
    model: nn.Module, x_adv: Tensor, y: Tensor, y_true: Tensor | None, loss: str,
    targeted: bool, on_logits: Callable[[Tensor], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample loss ``[N]``, input gradient of its sum and logits, at ``x_adv``.

    Only the input gets a gradient (``torch.autograd.grad``): no parameter grads exist.
    ``on_logits`` sees the logits before the loss is taken (the deferred label check).
    """
    xg = x_adv.detach().requires_grad_(True)
    logits = model(xg)
    if on_logits is not None:
        on_logits(logits)
    per = attack_loss(loss, targeted, logits, y, y_true)
    (g,) = torch.autograd.grad(per.sum(), xg)
    return per.detach(), g, logits.detach()


def perturbation_size(d: Tensor, norm: str) -> Tensor:
    """Per-sample size ``[N]`` of perturbations ``d`` (``[N, ...]``) in the threat norm."""
    d = d.flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def project(v: Tensor, x: Tensor, *, eps: float, norm: str, lo: float, hi: float) -> Tensor:
    """Project ``v`` onto the ``eps``-ball around ``x`` and clip to ``[lo, hi]``.

    This is ``pgd_step`` with a zero gradient (sign(0) = 0 for L∞; a zero step for L2),
    so projections share the fused op's exact semantics.
    """
    v = v.contiguous()
    return ops.pgd_step(v, torch.zeros_like(v), x, alpha=1.0, eps=eps, norm=norm, clip=(lo, hi))


def final_select(model: nn.Module, x_adv: Tensor, b: Batch, loss: str, targeted: bool,
                 losses: Tensor | None = None) -> Tensor:
    """Pick each sample's best restart (one extra forward when ``losses`` is not given)."""
    if b.restarts == 1:
        return x_adv
    with torch.no_grad():  # in the attack's row chunks: one R*B batch overflows CPU caches
        logits = torch.cat([model(x_adv[rows])
                            for rows in row_chunks(x_adv.shape[0], b.restarts, x_adv.device)])
        if losses is None:
            losses = attack_loss(loss, targeted, logits, b.y, b.y_true)
        won = fooled_mask(logits, b.y, targeted)
    return select_restarts(x_adv, losses, b.restarts, fooled=won)


# One compiled forward per (model, compiler backend): an attack's many steps, and later
# attacks on the same model, reuse it (dynamo guards recompile only on a new shape/mode).
_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()


def compiled(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile(model, backend=backend)``, built once per model and reused.

    The result shares ``model``'s parameters and buffers (masks included), so pruning or
    training the model is seen by it. Forward and backward (AOTAutograd) are compiled
    through the custom ops, which have fake kernels and registered autograd.
    """
    per_model = _COMPILED.setdefault(model, {})
    if backend not in per_model:
        per_model[backend] = torch.compile(model, backend=backend)
    return per_model[backend]
