"""FGSM (Goodfellow et al. 2015) and FGSM with random start (Wong et al. 2020)."""

from __future__ import annotations

from torch import Tensor, nn

from . import _hygiene as H
from .pgd import run_pgd


def fgsm(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf",
    targeted: bool = False, loss: str = "ce", clip: tuple[float, float] = (0.0, 1.0),
    random_start: bool = False, alpha: float | None = None,
) -> Tensor:
    """One signed-gradient (L∞) or normalised-gradient (L2) step.

    Default: ``x + eps * sign(grad)`` clipped to ``clip``. With ``random_start=True`` and
    ``alpha``: start uniformly in the ``eps``-ball, take one step of size ``alpha`` and
    project back (the "FGSM-RS" step of fast adversarial training). Same hygiene as
    :func:`pgd`.
    """
    H.check_config("fgsm", eps=eps, norm=norm, loss=loss, alpha=alpha, clip=clip)
    if eps == 0:
        # A zero-radius ball: the only admissible point is x itself (alpha must stay > 0).
        alpha, steps = 1.0, 0
    else:
        alpha, steps = (eps if alpha is None else alpha), 1
    return run_pgd("fgsm", model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm,
                   random_start=random_start and steps > 0, restarts=1, targeted=targeted,
                   loss=loss, clip=clip, early_stop=False, x_init=None)
