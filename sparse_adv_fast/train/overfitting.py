"""Catastrophic-overfitting detector (Wong et al. 2020, early stopping on PGD accuracy).

During FGSM-style training, PGD accuracy can collapse within an epoch while FGSM accuracy
keeps rising. After each epoch, PGD accuracy on a fixed validation batch is fed to
:class:`OverfitDetector`; a sharp fall relative to the best so far flags the epoch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@dataclass
class OverfitDetector:
    """Flags a fall of PGD accuracy below ``ratio * best`` **and** by more than ``drop``
    (absolute, accuracies in [0, 1]) below the best so far; keeps the best model state.

    Both conditions are required so that noise around a low accuracy (say 0.04 -> 0.01)
    is not taken for a collapse.
    """

    ratio: float = 0.5
    drop: float = 0.2
    best_acc: float = -math.inf
    best_epoch: int | None = None
    best_state: dict[str, Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"co ratio must be in [0, 1], got {self.ratio!r}")
        if not 0.0 <= self.drop <= 1.0:
            raise ValueError(f"co drop must be in [0, 1], got {self.drop!r}")

    def collapsed(self, acc: float) -> bool:
        """Whether ``acc`` is a catastrophic fall from the best seen so far."""
        if self.best_epoch is None:
            return False
        return acc < self.ratio * self.best_acc and self.best_acc - acc > self.drop

    def update(self, epoch: int, acc: float, model: nn.Module | None = None) -> bool:
        """Record epoch ``epoch``'s PGD accuracy; return True on a collapse.

        On a new best (ties go to the later epoch) the model's state is copied to CPU.
        """
        if self.collapsed(acc):
            return True
        if acc >= self.best_acc:
            self.best_acc, self.best_epoch = float(acc), int(epoch)
            if model is not None:
                self.best_state = _cpu_state(model)
        return False

    def restore_best(self, model: nn.Module) -> None:
        """Load the best state into ``model`` (strict)."""
        if self.best_state is None:
            raise RuntimeError("OverfitDetector: no best state recorded to roll back to")
        model.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        """Thresholds, best accuracy / epoch and best model state, for checkpoints."""
        return {"ratio": self.ratio, "drop": self.drop, "best_acc": self.best_acc,
                "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore the best accuracy / epoch / state saved by :meth:`state_dict`."""
        self.best_acc = float(d["best_acc"])
        self.best_epoch = d["best_epoch"]
        self.best_state = copy.copy(d["best_state"])


__all__ = ["OverfitDetector"]
