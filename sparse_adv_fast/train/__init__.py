"""Adversarial training: ``fit`` (natural, PGD-AT, TRADES, FGSM-RS) and ``evaluate``.

``evaluate`` is ``saf.attacks.evaluate.evaluate`` re-exported (imported on first use).
"""

from __future__ import annotations

from typing import Any

from ..checkpoint import CheckpointError
from ..finite import NonFiniteError
from .collapse import TrainingCollapsed
from .config import TrainConfig
from .fit import fit
from .history import History
from .methods import METHODS
from .overfitting import OverfitDetector


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        from ..attacks.evaluate import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "CheckpointError", "History", "NonFiniteError", "OverfitDetector",
           "TrainConfig", "TrainingCollapsed", "evaluate", "fit"]
