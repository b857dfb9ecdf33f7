"""TRADES (Zhang et al. 2019): the KL-maximising inner attack and the outer loss.

Attack: start at ``x + 0.001 * randn``, then ``steps`` fused PGD steps
(``saf.ops.pgd_step``) ascending ``KL(f(x) || f(x_adv))``. Evaluation hygiene as for every
attack (``saf.attacks.attack_mode``): the model runs in eval mode with parameters frozen,
and both are restored.
Loss: ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` (batch mean) in train mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import attack_mode
from ..ops import pgd_step


def _kl(logits_clean_or_probs: Tensor, logits_adv: Tensor, *, probs: bool,
        reduction: str) -> Tensor:
    p = logits_clean_or_probs if probs else F.softmax(logits_clean_or_probs, dim=1)
    return F.kl_div(F.log_softmax(logits_adv, dim=1), p, reduction=reduction)


def trades_attack(
    model: nn.Module, x: Tensor, *, eps: float, alpha: float, steps: int, norm: str = "linf",
    clip: tuple[float, float] = (0.0, 1.0), init_std: float = 0.001,
) -> Tensor:
    """``x_adv`` in the ``eps``-ball around ``x`` maximising ``KL(f(x) || f(x_adv))``."""
    if eps == 0 or steps == 0:
        return x.detach().clone()
    x = x.detach()
    with attack_mode(model):
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        x_adv = (x + init_std * torch.randn_like(x)).clamp_(*clip)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = _kl(p_clean, model(x_adv), probs=True, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = pgd_step(x_adv.detach(), grad, x, alpha=alpha, eps=eps, norm=norm, clip=clip)
    return x_adv.detach()


def trades_loss(
    model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """``(loss, logits_adv)``: CE on clean plus ``beta`` times the batch-mean KL.

    The clean distribution is not detached, as in the reference implementation.
    """
    logits_clean = model(x)
    logits_adv = model(x_adv)
    natural = F.cross_entropy(logits_clean, y)
    robust = _kl(logits_clean, logits_adv, probs=False, reduction="batchmean")
    return natural + beta * robust, logits_adv


__all__ = ["trades_attack", "trades_loss"]
