"""Per-method training losses: one small function each, one registry (``METHODS``).

Every function takes ``(model, x, y, cfg)`` with the model in train mode (``fit`` sets it;
the attacks restore each module's mode), and optionally ``target``: the module the
attack runs on (default ``model``; in a data-parallel run ``model`` is the
``DistributedDataParallel`` wrapper, whose forward starts a gradient all-reduce, and
``target`` the plain module it wraps, attacked locally on the rank's own shard). It returns
``(loss, logits)``, the logits being those of the inputs trained on (adversarial ones for
the adversarial methods), for the running train accuracy. The attacks switch the model to
eval mode with frozen parameters and restore it; the loss forward runs in train mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .. import attacks
from .trades import trades_attack, trades_loss


@dataclass(frozen=True)
class MethodConfig:
    """Attack settings shared by the training methods."""

    eps: float
    alpha: float
    steps: int
    norm: str = "linf"
    beta: float = 6.0
    clip: tuple[float, float] = (0.0, 1.0)


Loss = tuple[Tensor, Tensor]


def _ce(model: nn.Module, x: Tensor, y: Tensor) -> Loss:
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def _attacked(model: nn.Module, target: nn.Module | None) -> nn.Module:
    return model if target is None else target


def natural(model: nn.Module, x: Tensor, y: Tensor, cfg: MethodConfig,
            target: nn.Module | None = None) -> Loss:
    """Cross-entropy on clean inputs."""
    return _ce(model, x, y)


def pgd(model: nn.Module, x: Tensor, y: Tensor, cfg: MethodConfig,
        target: nn.Module | None = None) -> Loss:
    """PGD-AT (Madry et al. 2018): cross-entropy on PGD-``steps`` examples, random start."""
    if cfg.eps == 0:
        return _ce(model, x, y)
    x_adv = attacks.pgd(_attacked(model, target), x, y, eps=cfg.eps, alpha=cfg.alpha,
                        steps=cfg.steps, norm=cfg.norm, random_start=True, clip=cfg.clip)
    return _ce(model, x_adv.detach(), y)


def fgsm_rs(model: nn.Module, x: Tensor, y: Tensor, cfg: MethodConfig,
            target: nn.Module | None = None) -> Loss:
    """FGSM with random start (Wong et al. 2020): uniform start in the ball, one step of
    ``alpha`` (default ``1.25 * eps``), projected."""
    if cfg.eps == 0:
        return _ce(model, x, y)
    x_adv = attacks.fgsm(_attacked(model, target), x, y, eps=cfg.eps, norm=cfg.norm,
                         random_start=True, alpha=cfg.alpha, clip=cfg.clip)
    return _ce(model, x_adv.detach(), y)


def trades(model: nn.Module, x: Tensor, y: Tensor, cfg: MethodConfig,
           target: nn.Module | None = None) -> Loss:
    """TRADES: ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))``, ``x_adv`` from the KL attack."""
    x_adv = trades_attack(_attacked(model, target), x, eps=cfg.eps, alpha=cfg.alpha,
                          steps=cfg.steps, norm=cfg.norm, clip=cfg.clip)
    return trades_loss(model, x, y, x_adv, cfg.beta)


METHODS: dict[str, Callable[..., Loss]] = {
    "natural": natural, "pgd": pgd, "trades": trades, "fgsm_rs": fgsm_rs,
}

# alpha when the caller gives none, as a multiple of eps
DEFAULT_ALPHA = {"natural": 0.25, "pgd": 0.25, "trades": 0.25, "fgsm_rs": 1.25}


__all__ = ["DEFAULT_ALPHA", "METHODS", "MethodConfig", "fgsm_rs", "natural", "pgd", "trades"]
