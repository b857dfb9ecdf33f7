"""``History``: what ``fit`` measured, per epoch, plus how the run ended."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

EPOCH_KEYS = ("epoch", "train_loss", "train_acc", "val_clean_acc", "val_pgd_acc", "lr", "time")


def _plain(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN / inf
    return v


@dataclass
class History:
    """Per-epoch records and the run's outcome.

    ``epochs`` holds one dict per finished epoch with keys ``EPOCH_KEYS`` (``epoch`` is
    1-based; ``val_*`` are ``None`` without a validation loader, ``val_pgd_acc`` also when
    ``eps == 0``). ``co_detected_epoch`` is the epoch at which catastrophic overfitting was
    seen; the model was then rolled back to ``best_epoch`` (``rolled_back``) and training
    stopped. ``rewind_state`` is the state_dict saved at iteration ``rewind_at`` (CPU
    tensors; not part of :meth:`as_dict`).
    """

    method: str = "natural"
    epochs: list[dict[str, Any]] = field(default_factory=list)
    co_detected_epoch: int | None = None
    rolled_back: bool = False
    best_epoch: int | None = None
    best_val_pgd_acc: float | None = None
    resumed_from_epoch: int | None = None
    iterations: int = 0
    rewind_at: int | None = None
    rewind_state: dict[str, Tensor] | None = field(default=None, repr=False)

    def _col(self, key: str) -> list[Any]:
        return [e[key] for e in self.epochs]

    @property
    def train_loss(self) -> list[float]:
        """Mean training loss per epoch."""
        return self._col("train_loss")

    @property
    def train_acc(self) -> list[float]:
        """Training accuracy per epoch (on the inputs trained on)."""
        return self._col("train_acc")

    @property
    def val_clean_acc(self) -> list[float | None]:
        """Clean validation accuracy per epoch."""
        return self._col("val_clean_acc")

    @property
    def val_pgd_acc(self) -> list[float | None]:
        """Validation PGD accuracy per epoch (fixed batches)."""
        return self._col("val_pgd_acc")

    @property
    def lr(self) -> list[float]:
        """Learning rate used in each epoch."""
        return self._col("lr")

    @property
    def time(self) -> list[float]:
        """Seconds per epoch, validation included."""
        return self._col("time")

    def __len__(self) -> int:
        return len(self.epochs)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (no tensors; non-finite floats become ``None``)."""
        return {
            "method": self.method,
            "epochs": [{k: _plain(v) for k, v in e.items()} for e in self.epochs],
            "co_detected_epoch": self.co_detected_epoch,
            "rolled_back": self.rolled_back,
            "best_epoch": self.best_epoch,
            "best_val_pgd_acc": _plain(self.best_val_pgd_acc),
            "resumed_from_epoch": self.resumed_from_epoch,
            "iterations": self.iterations,
            "rewind_at": self.rewind_at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        """Inverse of :meth:`as_dict` (``rewind_state`` is not restored)."""
        return cls(
            method=d["method"],
            epochs=[dict(e) for e in d["epochs"]],
            co_detected_epoch=d.get("co_detected_epoch"),
            rolled_back=bool(d.get("rolled_back", False)),
            best_epoch=d.get("best_epoch"),
            best_val_pgd_acc=d.get("best_val_pgd_acc"),
            resumed_from_epoch=d.get("resumed_from_epoch"),
            iterations=int(d.get("iterations", 0)),
            rewind_at=d.get("rewind_at"),
        )


__all__ = ["EPOCH_KEYS", "History"]
