"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"): APGD-CE and APGD-DLR.

Per sample: step size starts at 2ε; a momentum step (α = 0.75) follows each projected
gradient step; at checkpoints ``w_j = ceil(p_j N)`` with ``p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` the step size is halved and the iterate
reset to the best point so far when (1) fewer than ``rho`` of the steps since the last
checkpoint increased the loss, or (2) the step size was not halved at the last checkpoint
and the best loss has not improved since.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops
from . import _core
from . import _hygiene as H
from .losses import fooled as fooled_mask

MOMENTUM = 0.75
_TINY = 1e-12


def checkpoints(steps: int) -> list[int]:
    """The iterations ``w_j = ceil(p_j * steps)`` (j >= 1) at which the schedule is checked."""
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1.0:
            break
        p.append(nxt)
    # Rounding first keeps float noise (0.22 + 0.19 = 0.41000000000000003) out of the ceil.
    ws = (math.ceil(round(q * steps, 9)) for q in p[1:])
    return sorted({w for w in ws if 0 < w <= steps})


def _direction(g: Tensor, norm: str) -> Tensor:
    if norm == "linf":
        return g.sign()
    n = g.flatten(1).norm(dim=1).reshape(-1, *([1] * (g.dim() - 1)))
    return g / (n + _TINY)


def apgd(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", steps: int = 100,
    loss: str = "ce", restarts: int = 1, targeted: bool = False,
    clip: tuple[float, float] = (0.0, 1.0), rho: float = 0.75,
) -> Tensor:
    """APGD with loss ``"ce"`` (APGD-CE) or ``"dlr"`` (APGD-DLR; ``"cw"`` also accepted).

    ``steps`` gradient steps after a random start in the ball (torch's global generator);
    ``restarts`` run as one batch, each sample keeping its first fooling restart, else the
    one with the highest loss. Each sample returns the first iterate that fooled the model,
    else its best-loss iterate. Targeted DLR uses the clean prediction as the true class.
    Same hygiene as :func:`sparse_adv_fast.attacks.pgd`.
    """
    where = "apgd"
    lo, hi = H.check_config(where, eps=eps, norm=norm, loss=loss, steps=steps,
                            restarts=restarts, clip=clip)
    if not (isinstance(rho, (int, float)) and 0.0 < rho <= 1.0):
        raise ValueError(f"{where}: rho must be in (0, 1], got {rho!r}")
    with H.attack_mode(model):
        b = _core.prepare(where, model, x, y, loss=loss, targeted=targeted, restarts=restarts,
                          lo=lo, hi=hi)
        out, best = _run(model, b, eps=eps, norm=norm, steps=steps, loss=loss,
                         targeted=targeted, rho=float(rho), where=where)
        return _core.final_select(model, out, b, loss, targeted, losses=best).detach()


def _run(
    model: nn.Module, b: _core.Batch, *, eps: float, norm: str, steps: int, loss: str,
    targeted: bool, rho: float, where: str,
) -> tuple[Tensor, Tensor]:
    """The APGD iteration over all rows; returns (per-row result, per-row best loss)."""
    lo, hi = b.lo, b.hi

    def proj(v: Tensor) -> Tensor:
        return _core.project(v, b.x, eps=eps, norm=norm, lo=lo, hi=hi)

    def evaluate(xk: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f, g, logits = _core.loss_grad(model, xk, b.y, b.y_true, loss, targeted)
        return f, g, fooled_mask(logits, b.y, targeted)

    x0 = ops.random_start(b.x, eps=eps, norm=norm, clip=(lo, hi))
    f, g, won = evaluate(x0)
    H.check_gradient(where, g)
    rows = x0.shape[0]
    shape = (rows, *([1] * (x0.dim() - 1)))

    x_fool, got = x0.clone(), won.clone()
    x_max, f_max, g_max = x0.clone(), f.clone(), g.clone()
    eta = torch.full((rows,), 2.0 * eps, device=x0.device, dtype=x0.dtype)
    x_prev, xk, gk, f_prev = x0, x0, g, f
    successes = torch.zeros(rows, device=x0.device, dtype=torch.long)
    reduced_last = torch.zeros(rows, device=x0.device, dtype=torch.bool)
    f_max_last = f_max.clone()
    marks, last_mark = set(checkpoints(steps)), 0

    for i in range(1, steps + 1):
        z = proj(xk + eta.reshape(shape) * _direction(gk, norm))
        if i == 1:  # no momentum on the first step
            x_new = z
        else:
            x_new = proj(xk + MOMENTUM * (z - xk) + (1.0 - MOMENTUM) * (xk - x_prev))
        x_prev, xk = xk, x_new
        f, gk, won = evaluate(xk)

        first = won & ~got
        x_fool[first] = xk[first]
        got |= won
        successes += (f > f_prev).long()
        better = f > f_max
        x_max[better], f_max[better], g_max[better] = xk[better], f[better], gk[better]
        f_prev = f

        if i in marks:
            cond1 = successes.to(f.dtype) < rho * (i - last_mark)
            cond2 = ~reduced_last & (f_max <= f_max_last)
            red = cond1 | cond2
            if bool(red.any()):
                eta = torch.where(red, eta / 2, eta)
                xk, gk, f_prev = xk.clone(), gk.clone(), f_prev.clone()
                xk[red], gk[red], f_prev[red] = x_max[red], g_max[red], f_max[red]
            reduced_last, f_max_last = red, f_max.clone()
            successes.zero_()
            last_mark = i

    out = torch.where(got.reshape(shape), x_fool, x_max)
    return out, f_max
