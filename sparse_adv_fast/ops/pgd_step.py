"""``pgd_step``: one fused projected-gradient step, and the fused random start.

L∞:  ``clip(min(max(x_adv + α·sign(g), x - ε), x + ε), lo, hi)``
L2:  ``x_adv + α·g/‖g‖`` per sample, projected onto the ε-ball around ``x``, clipped.

Backend contract (every backend exposes, on contiguous tensors of equal shape with the
batch in dim 0; ``out`` may be ``x_adv`` itself for the in-place form):

* ``step(x_adv, grad, x, alpha, eps, norm, lo, hi, out) -> out``
* ``random_init(x, noise, eps, norm, lo, hi) -> x0`` where ``noise`` comes from torch's
  global generator: uniform in [-1, 1] for L∞ (``x0 = clip(x + ε·noise)``); for L2 a
  standard normal whose per-sample direction is scaled to radius ``ε·u^(1/d)``, with ``u``
  the last column of ``noise`` reshaped ``(B, d + 1)``, so the start is uniform in the ball.

The functions below with those names are the pure-torch reference (CPU fallback, oracle);
the L∞ reference fixes the float operation order that every backend reproduces exactly.
Native kernels treat a NaN gradient entry as sign 0 (torch's ``sign`` gives NaN), so a NaN
gradient never poisons the iterate; inputs themselves are checked for NaN by the attacks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends

OP = "pgd_step"
NORMS = ("linf", "l2")
_TINY = 1e-12


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


# ---- pure-torch reference (the ``torch`` backend) ---------------------------------------
def step(
    x_adv: Tensor, grad: Tensor, x: Tensor, alpha: float, eps: float, norm: str, lo: float,
    hi: float, out: Tensor,
) -> Tensor:
    if norm == "linf":
        nxt = x_adv + alpha * torch.sign(grad)
        nxt = torch.minimum(torch.maximum(nxt, x - eps), x + eps)
    else:
        gn = grad.flatten(1).norm(dim=1)
        nxt = x_adv + _per_sample(alpha / (gn + _TINY), grad) * grad
        delta = nxt - x
        dn = delta.flatten(1).norm(dim=1)
        scale = torch.clamp(eps / (dn + _TINY), max=1.0)
        nxt = x + _per_sample(scale, delta) * delta
    return torch.clamp(nxt, lo, hi, out=out)


def random_init(x: Tensor, noise: Tensor, eps: float, norm: str, lo: float, hi: float) -> Tensor:
    if norm == "linf":
        return torch.clamp(x + eps * noise, lo, hi)
    b, d = x.shape[0], math.prod(x.shape[1:])
    noise = noise.reshape(b, d + 1)
    direction, u = noise[:, :d], noise[:, d].abs().clamp(max=1.0)
    radius = eps * u.pow(1.0 / d)
    direction = direction / (direction.norm(dim=1, keepdim=True) + _TINY)
    return torch.clamp(x + (direction * radius[:, None]).reshape(x.shape), lo, hi)


class _Ref:
    step = staticmethod(step)
    random_init = staticmethod(random_init)


_REF = _Ref()


def _describe(direction: str, args: tuple) -> backends.Call:
    """What ``auto`` keys a call on: (batch, per-sample size, norm) and the dtype.

    ``step`` may write into ``x_adv`` itself (``out``): its timing runs get a scratch output
    so that measuring never applies the step more than once.
    """
    x = args[0]
    norm = args[5] if direction == "step" else args[3]
    shape = (x.shape[0], math.prod(x.shape[1:]), str(norm))
    if direction != "step":
        return backends.Call(shape, x.dtype)
    return backends.Call(shape, x.dtype, scratch=lambda: (*args[:-1], torch.empty_like(args[-1])))


def _impl(device: torch.device):
    """The backend namespace for ``device``; in ``auto`` mode its functions pick per call
    by (direction, shape, dtype) through the registry."""
    return backends.impl(OP, device, _REF, _describe)


# ---- checks -----------------------------------------------------------------------------
def _check(x_adv: Tensor, grad: Tensor | None, x: Tensor, alpha: float, eps: float, norm: str,
           clip: tuple[float, float]) -> tuple[float, float]:
    if norm not in NORMS:
        raise ValueError(f"pgd_step: unknown norm {norm!r}; choose one of {NORMS}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"pgd_step: eps must be a finite number >= 0, got {eps!r}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"pgd_step: alpha must be > 0, got {alpha!r}")
    lo, hi = float(clip[0]), float(clip[1])
    if not lo < hi:
        raise ValueError(f"pgd_step: clip range must have lo < hi, got {clip!r}")
    shapes = {tuple(t.shape) for t in (x_adv, grad, x) if t is not None}
    if len(shapes) != 1:
        raise ValueError(f"pgd_step: x_adv, grad and x must have one shape, got {sorted(shapes)}")
    if x.dim() < 1:
        raise ValueError("pgd_step: inputs need a batch dimension")
    return lo, hi


def pgd_step(
    x_adv: Tensor, grad: Tensor, x: Tensor, *, alpha: float, eps: float, norm: str = "linf",
    clip: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """One PGD step from ``x_adv`` along ``grad``, projected to the ``eps``-ball around
    ``x`` (``norm`` ``"linf"`` or ``"l2"``) and clipped to ``clip``; returns a new tensor."""
    lo, hi = _check(x_adv, grad, x, alpha, eps, norm, clip)
    xa, g, x0 = x_adv.contiguous(), grad.contiguous(), x.contiguous()
    out = torch.empty_like(xa)
    return _impl(x.device).step(xa, g, x0, float(alpha), float(eps), norm, lo, hi, out)


def pgd_step_(
    x_adv: Tensor, grad: Tensor, x: Tensor, *, alpha: float, eps: float, norm: str = "linf",
    clip: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """In-place :func:`pgd_step`: overwrites and returns ``x_adv`` (which must be contiguous)."""
    lo, hi = _check(x_adv, grad, x, alpha, eps, norm, clip)
    if not x_adv.is_contiguous():
        raise ValueError("pgd_step_: x_adv must be contiguous for the in-place form")
    _impl(x.device).step(
        x_adv, grad.contiguous(), x.contiguous(), float(alpha), float(eps), norm, lo, hi, x_adv
    )
    return x_adv


def random_start(
    x: Tensor, *, eps: float, norm: str = "linf", clip: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """A random point of the ``eps``-ball around ``x`` (uniform in it), clipped to ``clip``.

    The noise comes from ``generator`` (default: torch's global generator), so a seeded
    run is reproducible on every backend.
    """
    lo, hi = _check(x, None, x, None, eps, norm, clip)
    x = x.contiguous()
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        noise = noise.mul_(2).sub_(1)
    else:
        b, d = x.shape[0], math.prod(x.shape[1:])
        noise = torch.randn((b, d + 1), generator=generator, device=x.device, dtype=x.dtype)
        noise[:, d] = torch.rand(b, generator=generator, device=x.device, dtype=x.dtype)
    return _impl(x.device).random_init(x, noise, float(eps), norm, lo, hi)
