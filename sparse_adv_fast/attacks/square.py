"""Square Attack (Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a
query-efficient black-box adversarial attack via random search"), L∞ version.

Score-based black box: the model is only *queried* (forward passes under ``no_grad``,
logits read, never a gradient). Random search on the margin loss
``f_y(x) - max_{j != y} f_j(x)`` (minimised; < 0 means misclassified):

* start: vertical stripes, every column of every channel shifted by ``±eps``;
* each iteration, per sample: a window of side ``s = round(sqrt(p * h * w))`` at a uniform
  position is set to ``x + rho * eps`` with one random sign ``rho`` per channel; the new
  point is kept when its loss is lower (or it is misclassified);
* ``p`` follows the paper's schedule: ``p_init`` (0.8) halved after iterations 10, 50,
  200, 500, 1000, 2000, 4000, 6000 and 8000 (stated for 10 000 queries;
  ``rescale_schedule=True`` stretches it to ``queries``, AutoAttack keeps it as is).

Unlike the reference, which draws one window and one colour per iteration for the whole
batch, every sample draws its own, as in the paper's algorithm. A draw that would leave
the window unchanged is redrawn once and then has one channel's sign flipped, so a query
is not wasted on the current point (the paper resamples until the window changes).
Inputs of shape ``[B, D]`` are searched over windows of ``round(p * D)`` consecutive
features.

On CPU the queries go through a frozen inference graph of the model when one can be built
and is checked to answer like it (``_frozen``; ``frozen_queries=False`` turns that off):
the same search, with forwards several times cheaper on small convolutional nets.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _hygiene as H
from ._frozen import Forward, query_forward
from .losses import cw

QUERIES = 5000  # AutoAttack's budget
P_INIT = 0.8
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(it: int, queries: int = QUERIES, p_init: float = P_INIT,
               rescale: bool = False) -> float:
    """The fraction ``p`` of features a window covers at iteration ``it`` (0-based)."""
    if rescale:
        it = int(it / queries * 10000)
    return p_init / 2 ** sum(it > h for h in _HALVINGS)


def _margin(forward: Forward, x: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{j != y} z_j``: the CW margin with the sign Square minimises."""
    return -cw(forward(x), y)


def square(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf",
    queries: int = QUERIES, p_init: float = P_INIT, restarts: int = 1,
    clip: tuple[float, float] = (0.0, 1.0), rescale_schedule: bool = False,
    generator: torch.Generator | None = None, frozen_queries: bool = True,
) -> Tensor:
    """Square Attack, L∞, untargeted, margin loss; returns ``x_adv`` (``x``'s shape).

    ``queries`` (default 5000, AutoAttack's) random-search iterations after the initial
    query, so a sample costs at most ``restarts * (queries + 1)`` forward passes; a sample
    stops as soon as it is misclassified. ``p_init`` = 0.8 and the schedule are the
    paper's. Only samples classified correctly at ``x`` are attacked. Each result lies in
    the ``eps``-ball and in ``clip``. Randomness from ``generator`` (default: torch's global
    generator). The model runs in eval mode with frozen parameters (both restored).
    ``frozen_queries`` lets CPU queries use a checked frozen inference graph (module
    docstring); whether a point fools the model is always decided by the model itself.
    """
    where = "square"
    lo, hi = H.check_config(where, eps=eps, norm=norm, steps=queries, restarts=restarts,
                            clip=clip)
    if norm != "linf":
        raise ValueError(f"{where}: only norm='linf' is implemented, got {norm!r}")
    if not (isinstance(p_init, (int, float)) and 0.0 < p_init <= 1.0):
        raise ValueError(f"{where}: p_init must be in (0, 1], got {p_init!r}")
    with H.attack_mode(model), torch.no_grad():
        H.check_batch(where, x, y, lo, hi)
        x = x.detach().contiguous()
        y = y.to(device=x.device, dtype=torch.long)
        logits = model(x)
        if logits.dim() != 2:
            raise ValueError(f"{where}: the model must return logits [B, classes], got "
                             f"{tuple(logits.shape)}")
        H.check_labels(where, y, logits.shape[1])
        out = x.clone()
        todo = (logits.argmax(1) == y).nonzero().squeeze(1)
        forward = query_forward(model, x[todo], enabled=frozen_queries)
        for _ in range(restarts):
            if todo.numel() == 0:
                break
            adv, won = _search(forward, x[todo], y[todo], eps=eps, queries=queries,
                               p_init=p_init, lo=lo, hi=hi, rescale=rescale_schedule,
                               gen=generator)
            if forward is not model and bool(won.any()):
                # The graph ranked the candidates; the model itself says what fooled it.
                won &= model(adv).argmax(1) != y[todo]
            out[todo[won]] = adv[won]
            todo = todo[~won]
        return out


def _search(
    forward: Forward, x: Tensor, y: Tensor, *, eps: float, queries: int, p_init: float,
    lo: float, hi: float, rescale: bool, gen: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """One run of the random search; returns (best points, misclassified mask)."""
    flat = x.dim() == 2
    xi = x.reshape(x.shape[0], 1, 1, -1) if flat else x.reshape(x.shape[0], x.shape[1], -1,
                                                                x.shape[-1])
    n, c, h, w = xi.shape
    dev, dt = x.device, x.dtype

    def signs(*shape: int) -> Tensor:
        return torch.randint(0, 2, shape, device=dev, generator=gen).to(dt).mul_(2).sub_(1)

    def query(xa: Tensor, yy: Tensor) -> Tensor:
        return _margin(forward, xa.reshape(-1, *x.shape[1:]), yy)

    best = (xi + eps * signs(n, c, 1, w)).clamp_(lo, hi)
    margin = query(best, y)
    out, won = best.clone(), margin <= 0
    ids = (~won).nonzero().squeeze(1)
    xc, bc, yc, mc = xi[ids], best[ids], y[ids], margin[ids]
    rows_h = torch.arange(h, device=dev)
    rows_w = torch.arange(w, device=dev)
    for it in range(queries):
        if ids.numel() == 0:
            break
        k = ids.numel()
        p = p_schedule(it, queries, p_init, rescale)
        if flat:
            sh, sw = 1, min(max(int(round(p * w)), 1), w)
        else:
            sh = sw = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
        vh = torch.randint(0, h - sh + 1, (k,), device=dev, generator=gen)
        vw = torch.randint(0, w - sw + 1, (k,), device=dev, generator=gen)
        mh = (rows_h >= vh[:, None]) & (rows_h < (vh + sh)[:, None])  # [k, h]
        mw = (rows_w >= vw[:, None]) & (rows_w < (vw + sw)[:, None])  # [k, w]
        win = (mh[:, :, None] & mw[:, None, :])[:, None]  # [k, 1, h, w]
        colour = signs(k, c, 1, 1)
        cand = torch.where(win, (xc + eps * colour).clamp_(lo, hi), bc)
        same = ~((cand != bc) & win).flatten(1).any(1)
        if bool(same.any()):  # redraw once, then flip one channel: never query bc itself
            colour[same] = signs(int(same.sum()), c, 1, 1)
            still = same & ~((torch.where(win, (xc + eps * colour).clamp(lo, hi), bc) != bc)
                             & win).flatten(1).any(1)
            if bool(still.any()):
                ch = torch.randint(0, c, (int(still.sum()),), device=dev, generator=gen)
                colour[still.nonzero().squeeze(1), ch] *= -1
            cand = torch.where(win, (xc + eps * colour).clamp_(lo, hi), bc)
        m = query(cand, yc)
        better = (m < mc) | (m <= 0)
        bc = torch.where(better[:, None, None, None], cand, bc)
        mc = torch.where(better, m, mc)
        done = mc <= 0
        if bool(done.any()):
            out[ids[done]] = bc[done]
            won[ids[done]] = True
            keep = ~done
            ids, xc, bc, yc, mc = ids[keep], xc[keep], bc[keep], yc[keep], mc[keep]
    out[ids] = bc
    return out.reshape(x.shape), won
