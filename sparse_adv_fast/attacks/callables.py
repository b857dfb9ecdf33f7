"""Attack objects ``atk = PGD(model, eps=..., ...)``; ``atk(x, y) -> x_adv``.

The configuration is validated when the object is built (a bad ``eps`` fails there, not
at the first batch); each call runs the matching function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from . import _hygiene as H
from .apgd import apgd, apgd_t
from .fab import fab
from .fgsm import fgsm
from .pgd import pgd
from .square import square


class _Attack:
    _fn: Callable[..., Tensor]
    _name: str

    def __init__(self, model: nn.Module, **cfg: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self._name}: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        self._validate(cfg)
        self.model = model
        self.cfg = dict(cfg)

    def _validate(self, cfg: dict[str, Any]) -> None:
        raise NotImplementedError

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """The adversarial examples for inputs ``x`` and labels (or targets) ``y``."""
        return type(self)._fn(self.model, x, y, **self.cfg)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.cfg.items())
        return f"{self._name}({args})"


def _common(name: str, cfg: dict[str, Any], allowed: set[str], required: set[str]) -> None:
    unknown = set(cfg) - allowed
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    missing = required - set(cfg)
    if missing:
        raise TypeError(f"{name}: missing required option(s) {sorted(missing)}")


class FGSM(_Attack):
    """Callable form of :func:`sparse_adv_fast.attacks.fgsm`."""

    _fn = staticmethod(fgsm)
    _name = "FGSM"

    def _validate(self, cfg: dict[str, Any]) -> None:
        _common(self._name, cfg,
                {"eps", "norm", "targeted", "loss", "clip", "random_start", "alpha"}, {"eps"})
        H.check_config(self._name, eps=cfg["eps"], norm=cfg.get("norm", "linf"),
                       loss=cfg.get("loss", "ce"), alpha=cfg.get("alpha"),
                       clip=cfg.get("clip", (0.0, 1.0)))


class PGD(_Attack):
    """Callable form of :func:`sparse_adv_fast.attacks.pgd`."""

    _fn = staticmethod(pgd)
    _name = "PGD"

    def _validate(self, cfg: dict[str, Any]) -> None:
        _common(self._name, cfg,
                {"eps", "alpha", "steps", "norm", "random_start", "restarts", "targeted", "loss",
                 "clip", "early_stop"}, {"eps", "alpha", "steps"})
        H.check_config(self._name, eps=cfg["eps"], norm=cfg.get("norm", "linf"),
                       loss=cfg.get("loss", "ce"), alpha=cfg["alpha"], steps=cfg["steps"],
                       restarts=cfg.get("restarts", 1), clip=cfg.get("clip", (0.0, 1.0)))


class APGD(_Attack):
    """Callable form of :func:`sparse_adv_fast.attacks.apgd`."""

    _fn = staticmethod(apgd)
    _name = "APGD"

    def _validate(self, cfg: dict[str, Any]) -> None:
        _common(self._name, cfg,
                {"eps", "norm", "steps", "loss", "restarts", "targeted", "clip", "rho",
                 "eot_iter"}, {"eps"})
        H.check_config(self._name, eps=cfg["eps"], norm=cfg.get("norm", "linf"),
                       loss=cfg.get("loss", "ce"), steps=cfg.get("steps", 100),
                       restarts=cfg.get("restarts", 1), clip=cfg.get("clip", (0.0, 1.0)))


class APGDT(_Attack):
    """Callable form of :func:`sparse_adv_fast.attacks.apgd_t`."""

    _fn = staticmethod(apgd_t)
    _name = "APGDT"

    def _validate(self, cfg: dict[str, Any]) -> None:
        _common(self._name, cfg,
                {"eps", "norm", "steps", "n_target_classes", "restarts", "clip", "rho",
                 "eot_iter", "targets_at_once"}, {"eps"})
        H.check_config(self._name, eps=cfg["eps"], norm=cfg.get("norm", "linf"),
                       steps=cfg.get("steps", 100), restarts=cfg.get("restarts", 1),
                       clip=cfg.get("clip", (0.0, 1.0)))


class FAB(_Attack):
    """Callable form of :func:`sparse_adv_fast.attacks.fab` (FAB-T)."""

    _fn = staticmethod(fab)
    _name = "FAB"

    def _validate(self, cfg: dict[str, Any]) -> None:
        _common(self._name, cfg,
                {"eps", "norm", "steps", "n_target_classes", "restarts", "alpha_max", "eta",
                 "beta", "clip", "targets_at_once"}, set())
        eps = cfg.get("eps")
        H.check_config(self._name, eps=0.0 if eps is None else eps,
                       norm=cfg.get("norm", "linf"), steps=cfg.get("steps", 100),
                       restarts=cfg.get("restarts", 1), clip=cfg.get("clip", (0.0, 1.0)))


class Square(_Attack):
    """Callable form of :func:`sparse_adv_fast.attacks.square`."""

    _fn = staticmethod(square)
    _name = "Square"

    def _validate(self, cfg: dict[str, Any]) -> None:
        _common(self._name, cfg,
                {"eps", "norm", "queries", "p_init", "restarts", "clip", "rescale_schedule",
                 "generator"}, {"eps"})
        H.check_config(self._name, eps=cfg["eps"], norm=cfg.get("norm", "linf"),
                       steps=cfg.get("queries", 5000), restarts=cfg.get("restarts", 1),
                       clip=cfg.get("clip", (0.0, 1.0)))
