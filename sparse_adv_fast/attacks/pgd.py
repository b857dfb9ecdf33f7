"""Projected gradient descent (Madry et al. 2018) with batched restarts and early stop."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.restart_select import row_chunks
from . import _core, _fold
from . import _hygiene as H
from .losses import fooled as fooled_mask


def _iterate(
    model: nn.Module, b: _core.Batch, x_adv: Tensor, *, alpha: float, eps: float, norm: str,
    steps: int, loss: str, targeted: bool, early_stop: bool, first: _FirstStep | None,
) -> Tensor:
    """``steps`` fused PGD steps from ``x_adv`` (updated in place and returned).

    ``first`` holds the once-per-attack checks run on the first step's forward and gradient
    (the label check and the gradient-masking probe); None for later row chunks.
    """
    clip = (b.lo, b.hi)
    active = torch.ones(x_adv.shape[0], dtype=torch.bool, device=x_adv.device)
    for k in range(steps):
        probe = first if k == 0 else None
        on_logits = probe.logits if probe is not None else None
        if not early_stop:
            _, g, _ = _core.loss_grad(model, x_adv, b.y, b.y_true, loss, targeted, on_logits)
            if probe is not None:
                probe.gradient(g)
            ops.pgd_step_(x_adv, g, b.x, alpha=alpha, eps=eps, norm=norm, clip=clip)
            continue
        # Early stop: only still-unfooled rows are run; samples are independent in eval
        # mode, so the other rows follow exactly the trajectory they would have anyway.
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        yt = b.y_true[idx] if b.y_true is not None else None
        xa = x_adv[idx]
        _, g, logits = _core.loss_grad(model, xa, b.y[idx], yt, loss, targeted, on_logits)
        if probe is not None:
            probe.gradient(g)
        done = fooled_mask(logits, b.y[idx], targeted)
        active[idx[done]] = False
        keep = ~done
        if bool(keep.any()):
            x_adv[idx[keep]] = ops.pgd_step(
                xa[keep], g[keep], b.x[idx[keep]], alpha=alpha, eps=eps, norm=norm, clip=clip
            )
    return x_adv


class _FirstStep:
    """The attack's once-only checks, run on its first forward and gradient."""

    def __init__(self, where: str, y_all: Tensor, loss: str, targeted: bool) -> None:
        self.where, self.y_all, self.loss, self.targeted = where, y_all, loss, targeted

    def logits(self, logits: Tensor) -> None:
        """Deferred label check: every label (all chunks) against the model's outputs."""
        _core.check_logits(self.where, logits, self.y_all, self.loss, self.targeted)

    def gradient(self, g: Tensor) -> None:
        """Gradient-masking probe on the first step's input gradient."""
        H.check_gradient(self.where, g)


def _chunk(b: _core.Batch, rows: slice) -> _core.Batch:
    yt = b.y_true[rows] if b.y_true is not None else None
    return _core.Batch(b.x[rows], b.y[rows], yt, b.restarts, b.lo, b.hi)


def pgd(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, alpha: float, steps: int,
    norm: str = "linf", random_start: bool = True, restarts: int = 1, targeted: bool = False,
    loss: str = "ce", clip: tuple[float, float] = (0.0, 1.0), early_stop: bool = False,
    x_init: Tensor | None = None, compile: bool | str = False,
) -> Tensor:
    """PGD attack: ``steps`` steps of size ``alpha`` in the ``eps``-ball (``norm`` ``"linf"``
    or ``"l2"``), each a fused :func:`sparse_adv_fast.ops.pgd_step_`.

    ``random_start=False`` starts at ``x`` (the textbook deterministic iterate);
    ``random_start=True`` starts uniformly in the ball (torch's global generator).
    ``restarts`` R runs as one batch of R·B rows; each sample returns its first restart
    that fools the model, else the one with the highest final loss. ``early_stop`` freezes a
    row as soon as it fools the model (the other rows are unaffected). ``targeted`` makes
    ``y`` the target classes. ``loss`` is ``"ce"``, ``"cw"`` (margin) or ``"dlr"``.
    ``x_init`` (``[R*B, ...]``, restart-major) gives explicit starting points instead.

    The model runs in eval mode with frozen parameters (both restored); inputs must lie in
    ``clip``, and so does the result. Returns ``x_adv`` with ``x``'s shape.
    """
    return run_pgd("pgd", model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm,
                   random_start=random_start, restarts=restarts, targeted=targeted, loss=loss,
                   clip=clip, early_stop=early_stop, x_init=x_init, compile=compile)


def run_pgd(
    where: str, model: nn.Module, x: Tensor, y: Tensor, *, eps: float, alpha: float,
    steps: int, norm: str, random_start: bool, restarts: int, targeted: bool, loss: str,
    clip: tuple[float, float], early_stop: bool, x_init: Tensor | None,
    compile: bool | str = False,
) -> Tensor:
    """:func:`pgd` with ``where`` naming the public entry point in error messages."""
    lo, hi = H.check_config(where, eps=eps, norm=norm, loss=loss, alpha=alpha, steps=steps,
                            restarts=restarts, clip=clip)
    if x_init is not None:
        rows = restarts * x.shape[0]
        if not isinstance(x_init, Tensor) or tuple(x_init.shape) != (rows, *x.shape[1:]):
            raise ValueError(f"{where}: x_init must have shape {(rows, *x.shape[1:])} "
                             f"(restarts * batch, ...), got "
                             f"{getattr(x_init, 'shape', type(x_init).__name__)}")
    with H.attack_mode(model), contextlib.ExitStack() as scope:
        if compile:  # the compiled module shares model's parameters, buffers and modes
            model = _core.compiled(model, "inductor" if compile is True else compile)
        else:
            model = scope.enter_context(_fold.folded(model))
        # With steps, the labels are checked on the first step's forward (no extra one).
        b = _core.prepare(where, model, x, y, loss=loss, targeted=targeted, restarts=restarts,
                          lo=lo, hi=hi, defer_labels=steps > 0)
        if x_init is not None:
            x_adv = _core.project(x_init.detach().to(b.x), b.x, eps=eps, norm=norm, lo=lo, hi=hi)
        elif random_start:
            x_adv = ops.random_start(b.x, eps=eps, norm=norm, clip=(lo, hi))
        else:
            x_adv = b.x.clone()
        x_adv = x_adv.contiguous()
        first: _FirstStep | None = _FirstStep(where, b.y, loss, targeted)
        # Restarts run in cache-sized row chunks (restart_select.row_chunks); each chunk is
        # a slice of x_adv, stepped in place.
        for rows in row_chunks(x_adv.shape[0], restarts, x_adv.device):
            _iterate(model, _chunk(b, rows), x_adv[rows], alpha=alpha, eps=eps, norm=norm,
                     steps=steps, loss=loss, targeted=targeted, early_stop=early_stop,
                     first=first)
            first = None
        return _core.final_select(model, x_adv, b, loss, targeted).detach()
