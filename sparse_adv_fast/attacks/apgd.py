"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"): APGD-CE, APGD-DLR and APGD-T.

Per sample: step size starts at 2ε; a momentum step (α = 0.75) follows each projected
gradient step; at checkpoints ``w_j = ceil(p_j N)`` with ``p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` the step size is halved and the iterate
reset to the best point so far when (1) fewer than ``rho`` of the steps since the last
checkpoint increased the loss, or (2) the step size was not halved at the last checkpoint
and the best loss has not improved since.

One engine (:func:`_run`) serves every variant. A row leaves the batch as soon as it fools
the model (its output is its first fooling iterate either way, so this only saves work:
in eval mode samples are independent), and rows can be grouped so that one success stops
every row of the same sample (APGD-T's target classes). ``eot_iter > 1`` averages the loss
and input gradient over that many forward passes (Expectation over Transformation, for
randomised models, as AutoAttack's "rand" version does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.restart_select import select_restarts
from . import _core, _fold
from . import _hygiene as H
from .losses import MIN_CLASSES
from .losses import fooled as fooled_mask

MOMENTUM = 0.75
N_TARGET_CLASSES = 9  # AutoAttack's standard APGD-T / FAB-T: the top-9 non-true classes
_TINY = 1e-12
# Rows per batched run when targets_at_once is not given: measured on CPU (digits CNN),
# ~500-1000 rows beat both one target at a time (per-iteration overhead) and all nine at
# once (activations fall out of cache).
_ROWS_PER_RUN = 768


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


def _check_eot(where: str, eot_iter: int) -> None:
    if not isinstance(eot_iter, int) or isinstance(eot_iter, bool) or eot_iter < 1:
        raise ValueError(f"{where}: eot_iter must be an integer >= 1, got {eot_iter!r}")


def _check_rho(where: str, rho: float) -> float:
    if not (isinstance(rho, (int, float)) and 0.0 < rho <= 1.0):
        raise ValueError(f"{where}: rho must be in (0, 1], got {rho!r}")
    return float(rho)


def apgd(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", steps: int = 100,
    loss: str = "ce", restarts: int = 1, targeted: bool = False,
    clip: tuple[float, float] = (0.0, 1.0), rho: float = 0.75, eot_iter: int = 1,
) -> Tensor:
    """APGD with loss ``"ce"`` (APGD-CE) or ``"dlr"`` (APGD-DLR; ``"cw"`` also accepted).

    ``steps`` gradient steps (default 100, as in the paper) after a random start in the
    ball (torch's global generator); ``restarts`` run as one batch, each sample keeping its
    first fooling restart, else the one with the highest loss. Each sample returns the
    first iterate that fooled the model, else its best-loss iterate. Targeted DLR uses the
    clean prediction as the true class. ``rho`` = 0.75 is the paper's oscillation
    threshold; ``eot_iter`` (default 1) averages loss and gradient over that many forward
    passes (EOT, for randomised models; AutoAttack's "rand" version uses 20). Same hygiene
    as :func:`sparse_adv_fast.attacks.pgd`.
    """
    where = "apgd"
    lo, hi = H.check_config(where, eps=eps, norm=norm, loss=loss, steps=steps,
                            restarts=restarts, clip=clip)
    rho = _check_rho(where, rho)
    _check_eot(where, eot_iter)
    with H.attack_mode(model), _fold.folded(model) as model:
        b = _core.prepare(where, model, x, y, loss=loss, targeted=targeted, restarts=restarts,
                          lo=lo, hi=hi)
        out, best, won = _run(model, b, eps=eps, norm=norm, steps=steps, loss=loss,
                              targeted=targeted, rho=rho, where=where, eot_iter=eot_iter)
        if b.restarts == 1:
            return out.detach()
        return select_restarts(out, best, b.restarts, fooled=won).detach()


def apgd_t(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", steps: int = 100,
    n_target_classes: int = N_TARGET_CLASSES, restarts: int = 1,
    clip: tuple[float, float] = (0.0, 1.0), rho: float = 0.75, eot_iter: int = 1,
    targets_at_once: int | None = None,
) -> Tensor:
    """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` for each of the ``n_target_classes``
    (default 9) highest-scoring non-true classes ``t`` at the clean point.

    Untargeted in effect: a sample counts as broken (and its run stops) when any target's
    run makes the prediction differ from ``y``, as in the paper's evaluation. ``steps``
    (default 100), ``restarts`` (default 1 per target), ``rho`` and ``eot_iter`` are as in
    :func:`apgd`. Only samples classified correctly at ``x`` are attacked (the others are
    returned unchanged). ``targets_at_once`` (default: all) bounds how many targets run as
    one batch (default: as many as keep a run near 768 rows); the reference runs them one
    after another on the still-robust points, which has the same outcome per sample but
    pays the per-iteration overhead once per target.
    Returns, per sample, a fooling point if one was found, else the highest-loss iterate.
    """
    where = "apgd_t"
    lo, hi = H.check_config(where, eps=eps, norm=norm, steps=steps, restarts=restarts,
                            clip=clip)
    rho = _check_rho(where, rho)
    _check_eot(where, eot_iter)
    if not isinstance(n_target_classes, int) or isinstance(n_target_classes, bool) or \
            n_target_classes < 1:
        raise ValueError(f"{where}: n_target_classes must be an integer >= 1, got "
                         f"{n_target_classes!r}")
    if targets_at_once is not None and (not isinstance(targets_at_once, int)
                                        or targets_at_once < 1):
        raise ValueError(f"{where}: targets_at_once must be None or an integer >= 1, got "
                         f"{targets_at_once!r}")
    with H.attack_mode(model), _fold.folded(model) as model:
        x, y, targets, todo = targeted_start(where, model, x, y, lo, hi, n_target_classes,
                                             MIN_CLASSES[("dlr", True)])
        out = x.clone()
        per = targets_at_once or max(1, _ROWS_PER_RUN // max(1, todo.numel()))
        for k0 in range(0, targets.shape[1], per):
            if todo.numel() == 0:
                break
            ts = targets[todo, k0:k0 + per]  # [n, k]
            n, k = ts.shape
            reps = k * restarts
            xr = x[todo].repeat((reps,) + (1,) * (x.dim() - 1))
            b = _core.Batch(xr, ts.t().reshape(-1).repeat(restarts), y[todo].repeat(reps),
                            reps, lo, hi)
            group = torch.arange(n, device=x.device).repeat(reps)
            rows, best, won = _run(model, b, eps=eps, norm=norm, steps=steps, loss="dlr",
                                   targeted=True, rho=rho, where=where, eot_iter=eot_iter,
                                   success="untargeted", group=group)
            out[todo] = select_restarts(rows, best, reps, fooled=won)
            fooled_any = won.reshape(reps, n).any(0)
            todo = todo[~fooled_any]
        return out.detach()


def targeted_start(where: str, model: nn.Module, x: Tensor, y: Tensor, lo: float, hi: float,
                   n_target_classes: int, min_classes: int = 2
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The common start of the targeted attacks (APGD-T, FAB-T), inside ``attack_mode``: the
    batch checked, detached and contiguous, ``y`` as long on its device, the labels checked
    against the clean logits, the :func:`top_targets` of each sample and the indices of
    the correctly classified ones (the only rows attacked): ``(x, y, targets, todo)``."""
    H.check_batch(where, x, y, lo, hi)
    x = x.detach().contiguous()
    y = y.to(device=x.device, dtype=torch.long)
    with torch.no_grad():
        logits = model(x)
    H.check_labels(where, y, logits.shape[1], min_classes)
    targets = top_targets(logits, y, n_target_classes)
    todo = (logits.argmax(1) == y).nonzero().squeeze(1)
    return x, y, targets, todo


def top_targets(logits: Tensor, y: Tensor, n: int) -> Tensor:
    """The ``min(n, C - 1)`` highest-scoring classes other than ``y``, best first ``[B, k]``.

    For a correctly classified sample these are the ranks 2..k+1 of the logits, the
    targets of APGD-T and FAB-T in AutoAttack.
    """
    k = min(n, logits.shape[1] - 1)
    masked = logits.scatter(1, y[:, None], float("-inf"))
    return masked.topk(k, dim=1).indices


@dataclass
class _Rows:
    """The per-row state of the APGD iteration over the rows still running."""

    ids: Tensor  # original row index
    x: Tensor
    y: Tensor
    y_true: Tensor | None
    xk: Tensor
    x_prev: Tensor
    gk: Tensor
    f_prev: Tensor
    x_max: Tensor
    f_max: Tensor
    g_max: Tensor
    eta: Tensor
    successes: Tensor
    reduced_last: Tensor
    f_max_last: Tensor

    def keep(self, m: Tensor) -> _Rows:
        return _Rows(*(None if v is None else v[m]
                       for v in (getattr(self, f.name) for f in fields(self))))


def _run(
    model: nn.Module, b: _core.Batch, *, eps: float, norm: str, steps: int, loss: str,
    targeted: bool, rho: float, where: str, eot_iter: int = 1, success: str = "target",
    group: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The APGD iteration over all rows of ``b``.

    ``success="target"``: a row succeeds when :func:`losses.fooled` says so for ``b.y``;
    ``"untargeted"``: when its prediction differs from ``b.y_true`` (APGD-T). A row stops
    at its first success; with ``group`` (a sample id per row) a success stops every row
    of the same group. Returns (per-row result, per-row best loss, per-row success): the
    result is the first successful iterate, else the best-loss one.
    """
    def evaluate(xk: Tensor, y: Tensor, yt: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        f, g, logits = _core.loss_grad(model, xk, y, yt, loss, targeted)
        for _ in range(eot_iter - 1):
            f2, g2, logits = _core.loss_grad(model, xk, y, yt, loss, targeted)
            f, g = f + f2, g + g2
        if eot_iter > 1:
            f, g = f / eot_iter, g / eot_iter
        won = logits.argmax(1) != yt if success == "untargeted" else \
            fooled_mask(logits, y, targeted)
        return f, g, won

    x0 = ops.random_start(b.x, eps=eps, norm=norm, clip=(b.lo, b.hi))
    f, g, won = evaluate(x0, b.y, b.y_true)
    H.check_gradient(where, g)
    n = x0.shape[0]
    dev, shape = x0.device, (-1, *([1] * (x0.dim() - 1)))
    out, out_f, out_won = x0.clone(), f.clone(), won.clone()
    s = _Rows(torch.arange(n, device=dev), b.x, b.y, b.y_true, x0, x0, g, f, x0, f, g,
              torch.full((n,), 2.0 * eps, device=dev, dtype=x0.dtype),
              torch.zeros(n, device=dev, dtype=torch.long),
              torch.zeros(n, device=dev, dtype=torch.bool), f)
    n_groups = int(group.max()) + 1 if group is not None and n else 0

    def retire(s: _Rows, won: Tensor) -> _Rows:
        """Drop the rows that succeeded (and their group mates); keep their results."""
        stop = won
        if group is not None:
            hit = torch.zeros(n_groups, dtype=torch.bool, device=dev)
            hit[group[s.ids[won]]] = True
            stop = hit[group[s.ids]]
        ids = s.ids[stop]
        out[ids] = torch.where(won[stop].reshape(shape), s.xk[stop], s.x_max[stop])
        out_f[ids] = s.f_max[stop]
        out_won[ids] = won[stop]
        return s.keep(~stop)

    if bool(won.any()):
        s = retire(s, won)
    marks, last_mark = set(checkpoints(steps)), 0
    for i in range(1, steps + 1):
        if s.ids.numel() == 0:
            break
        z = _core.project(s.xk + s.eta.reshape(shape) * _direction(s.gk, norm), s.x, eps=eps,
                          norm=norm, lo=b.lo, hi=b.hi)
        if i > 1:  # no momentum on the first step
            z = _core.project(s.xk + MOMENTUM * (z - s.xk) + (1.0 - MOMENTUM) * (s.xk - s.x_prev),
                              s.x, eps=eps, norm=norm, lo=b.lo, hi=b.hi)
        s.x_prev, s.xk = s.xk, z
        f, s.gk, won = evaluate(s.xk, s.y, s.y_true)
        s.successes = s.successes + (f > s.f_prev).long()
        better = f > s.f_max
        s.x_max = torch.where(better.reshape(shape), s.xk, s.x_max)
        s.g_max = torch.where(better.reshape(shape), s.gk, s.g_max)
        s.f_max = torch.where(better, f, s.f_max)
        s.f_prev = f
        if bool(won.any()):
            s = retire(s, won)
        if i in marks:
            cond1 = s.successes.to(s.f_max.dtype) < rho * (i - last_mark)
            cond2 = ~s.reduced_last & (s.f_max <= s.f_max_last)
            red = cond1 | cond2
            if bool(red.any()):
                r = red.reshape(shape)
                s.eta = torch.where(red, s.eta / 2, s.eta)
                s.xk = torch.where(r, s.x_max, s.xk)
                s.gk = torch.where(r, s.g_max, s.gk)
                s.f_prev = torch.where(red, s.f_max, s.f_prev)
            s.reduced_last, s.f_max_last = red, s.f_max
            s.successes = torch.zeros_like(s.successes)
            last_mark = i
    out[s.ids] = s.x_max
    out_f[s.ids] = s.f_max
    return out, out_f, out_won
