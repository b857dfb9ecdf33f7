"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein 2020b, "Minimally
distorted adversarial examples with a fast adaptive boundary attack"), L∞ and L2.

FAB looks for the *smallest* perturbation that changes the decision. For a target class
``t`` it linearises the decision boundary ``f_t - f_y = 0`` at the current iterate ``x_k``
and projects both ``x_k`` and the original point ``x_0`` onto that hyperplane intersected
with the data box (``delta_k``, ``delta_0``: exact minimal-norm projections). The next
iterate is the biased convex combination

    x_{k+1} = clip((1 - a) (x_k + eta delta_k) + a (x_0 + eta delta_0)),
    a = min(|delta_k| / (|delta_k| + |delta_0|), alpha_max),

which stays close to ``x_0`` (``eta`` = 1.05 overshoots the boundary slightly). When
``x_{k+1}`` is adversarial it is recorded if it beats the best norm so far and is pulled
back towards ``x_0``: ``x_{k+1} <- x_0 + beta (x_{k+1} - x_0)`` (``beta`` = 0.9).
Defaults (``steps`` = 100, ``alpha_max`` = 0.1, ``eta`` = 1.05, ``beta`` = 0.9, targets =
the 9 highest non-true classes, 1 restart) are AutoAttack's.

The box-constrained projection onto a hyperplane ``<w, z> = b`` is solved exactly per
row: with ``c = b - <w, p>`` (made >= 0 by flipping ``w``) and ``r_i`` the room to the box
along ``sign(w_i)``, the reachable increase at radius ``lambda`` is
``G(lambda) = sum_i |w_i| min(lambda, r_i)`` (L∞) or ``sum_i |w_i| min(lambda |w_i|, r_i)``
(L2), a piecewise-linear increasing function; one sort and a cumulative sum give the
smallest ``lambda`` with ``G(lambda) = c`` (the box corner when no such ``lambda`` exists).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _hygiene as H
from ._core import perturbation_size
from .apgd import N_TARGET_CLASSES, targeted_start

ALPHA_MAX, ETA, BETA = 0.1, 1.05, 0.9
_TINY = 1e-12


def project_hyperplane_box(p: Tensor, w: Tensor, b: Tensor, *, norm: str, lo: float = 0.0,
                           hi: float = 1.0) -> Tensor:
    """The minimal-norm ``d`` (rows of ``[N, D]``) with ``<w, p + d> = b`` and
    ``lo <= p + d <= hi``; where the box cannot reach the hyperplane, the box corner that
    gets closest. ``norm`` is ``"linf"`` or ``"l2"``."""
    c = b - (w * p).sum(1)
    s = torch.where(c < 0, -1.0, 1.0).to(w.dtype)
    w = w * s[:, None]
    c = c.abs()
    room = torch.where(w > 0, hi - p, p - lo).clamp_min(0)
    aw = w.abs()
    if norm == "linf":
        a, bp = aw, room
    else:
        a, bp = aw * aw, room / aw.clamp_min(_TINY)
    bp, order = bp.sort(dim=1)
    a = a.gather(1, order)
    cum_a, cum_ab = a.cumsum(1), (a * bp).cumsum(1)
    total = cum_a[:, -1:]
    reach = cum_ab + bp * (total - cum_a)  # G at each breakpoint, non-decreasing
    k = torch.searchsorted(reach, c[:, None].contiguous()).clamp_max(reach.shape[1] - 1)
    prev_ab = torch.where(k > 0, cum_ab.gather(1, (k - 1).clamp_min(0)), 0.0)
    prev_a = torch.where(k > 0, cum_a.gather(1, (k - 1).clamp_min(0)), 0.0)
    lam = (c[:, None] - prev_ab) / (total - prev_a).clamp_min(_TINY)
    feasible = reach[:, -1:] >= c[:, None]
    lam = torch.where(feasible, lam, bp[:, -1:])  # unreachable: go to the corner
    step = lam if norm == "linf" else lam * aw
    return torch.sign(w) * torch.minimum(step, room)


def fab(
    model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "linf", steps: int = 100,
    n_target_classes: int = N_TARGET_CLASSES, restarts: int = 1, eps: float | None = None,
    alpha_max: float = ALPHA_MAX, eta: float = ETA, beta: float = BETA,
    clip: tuple[float, float] = (0.0, 1.0), targets_at_once: int | None = None,
) -> Tensor:
    """FAB-T: per sample the smallest adversarial perturbation found over the
    ``n_target_classes`` (default 9) highest-scoring non-true classes, ``x_adv`` (``x``'s
    shape; ``x`` itself where none was found or ``x`` is already misclassified).

    A point counts as adversarial when its prediction differs from ``y``. The first
    restart starts at ``x``; further ones at a random point at distance ``eps / 2``
    (``eps`` is then required). With ``eps`` given, a sample stops as soon as it has an
    adversarial point within ``eps`` (enough for robust accuracy, as in AutoAttack), and
    samples whose smallest adversarial point lies outside ``eps`` get ``x`` back; pass
    ``eps=None`` to minimise the norm over the whole budget. ``targets_at_once``
    (default: all) bounds how many targets run as one batch. Runs under ``no_grad`` except
    for the one input gradient of ``f_t - f_y`` per iteration; eval mode, frozen
    parameters, both restored.
    """
    where = "fab"
    lo, hi = H.check_config(where, eps=0.0 if eps is None else eps, norm=norm, steps=steps,
                            restarts=restarts, clip=clip)
    if restarts > 1 and eps is None:
        raise ValueError(f"{where}: restarts > 1 start at distance eps / 2, so need eps")
    for name, v, top in (("alpha_max", alpha_max, 1.0), ("beta", beta, 1.0)):
        if not (isinstance(v, (int, float)) and 0.0 <= v <= top):
            raise ValueError(f"{where}: {name} must be in [0, {top:g}], got {v!r}")
    if not (isinstance(eta, (int, float)) and eta >= 1.0):
        raise ValueError(f"{where}: eta must be a number >= 1, got {eta!r}")
    with H.attack_mode(model):
        x, y, targets, todo = targeted_start(where, model, x, y, lo, hi, n_target_classes)
        n = x.shape[0]
        best = x.clone()
        best_norm = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
        per = targets_at_once or targets.shape[1]
        for r in range(restarts):
            for k0 in range(0, targets.shape[1], per):
                if eps is not None:
                    todo = todo[~(best_norm[todo] <= eps)]
                if todo.numel() == 0:
                    break
                ts = targets[todo, k0:k0 + per]
                m, k = ts.shape
                xr = x[todo].repeat((k,) + (1,) * (x.dim() - 1))
                adv, size = _run(model, xr, y[todo].repeat(k), ts.t().reshape(-1), norm=norm,
                                 steps=steps, eps=eps, rand=r > 0, alpha_max=alpha_max,
                                 eta=eta, beta=beta, lo=lo, hi=hi,
                                 group=torch.arange(m, device=x.device).repeat(k))
                size, j = size.reshape(k, m).min(0)
                pick = adv.reshape(k, m, *x.shape[1:])[j, torch.arange(m, device=x.device)]
                gain = size < best_norm[todo]
                best[todo[gain]] = pick[gain]
                best_norm[todo[gain]] = size[gain]
        if eps is not None:  # only adversarial points inside the threat ball are returned
            best[best_norm > eps] = x[best_norm > eps]
        return best


def _run(
    model: nn.Module, x0: Tensor, y: Tensor, t: Tensor, *, norm: str, steps: int,
    eps: float | None, rand: bool, alpha_max: float, eta: float, beta: float, lo: float,
    hi: float, group: Tensor,
) -> tuple[Tensor, Tensor]:
    """FAB iterations for rows ``(x0, y, target t)``; returns (best adversarial per row,
    its norm, inf where none). With ``eps``, a row whose group has an adversarial within
    ``eps`` stops."""
    n = x0.shape[0]
    shape = (-1, *([1] * (x0.dim() - 1)))
    best = x0.clone()
    best_norm = torch.full((n,), float("inf"), device=x0.device, dtype=x0.dtype)
    x1 = x0.clone()
    if rand:
        noise = torch.rand_like(x0) * 2 - 1 if norm == "linf" else torch.randn_like(x0)
        scale = perturbation_size(noise, norm).clamp_min(_TINY).reshape(shape)
        x1 = x0 + 0.5 * eps * noise / scale
        x1 = x1.clamp(lo, hi)
    ids = torch.arange(n, device=x0.device)
    n_groups = int(group.max()) + 1 if n else 0
    xs, ys, tc = x0, y, t
    for _ in range(steps):
        if ids.numel() == 0:
            break
        xg = x1.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xg)
            rows = torch.arange(xg.shape[0], device=x0.device)
            df = logits[rows, tc] - logits[rows, ys]
            (g,) = torch.autograd.grad(df.sum(), xg)
        with torch.no_grad():
            w = g.flatten(1)
            bb = (w * x1.flatten(1)).sum(1) - df.detach()
            d = project_hyperplane_box(torch.cat((x1.flatten(1), xs.flatten(1))),
                                       torch.cat((w, w)), torch.cat((bb, bb)), norm=norm,
                                       lo=lo, hi=hi)
            m = xs.shape[0]
            d1, d0 = d[:m].reshape(x1.shape), d[m:].reshape(x1.shape)
            a1 = perturbation_size(d1, norm).clamp_min(1e-8)
            a0 = perturbation_size(d0, norm).clamp_min(1e-8)
            alpha = (a1 / (a1 + a0)).clamp(0.0, alpha_max).reshape(shape)
            x1 = ((x1 + eta * d1) * (1 - alpha) + (xs + eta * d0) * alpha).clamp(lo, hi)
            is_adv = model(x1).argmax(1) != ys
            if bool(is_adv.any()):
                size = perturbation_size(x1 - xs, norm)
                gain = is_adv & (size < best_norm[ids])
                best[ids[gain]] = x1[gain]
                best_norm[ids[gain]] = size[gain]
                x1 = torch.where(is_adv.reshape(shape), xs + (x1 - xs) * beta, x1)
                if eps is not None:
                    hit = torch.zeros(n_groups, dtype=torch.bool, device=x0.device)
                    hit[group[ids[gain & (size <= eps)]]] = True
                    keep = ~hit[group[ids]]
                    if not bool(keep.all()):
                        ids, xs, ys, tc, x1 = ids[keep], xs[keep], ys[keep], tc[keep], x1[keep]
    return best, best_norm
