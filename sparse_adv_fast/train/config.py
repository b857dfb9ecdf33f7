"""``TrainConfig``: every setting of :func:`saf.train.fit`, validated in one place.

``fit(model, loaders, config=TrainConfig(...), **kw)``, a config file and a CLI flag all
build this object, so a keyword, a key and a flag share one check (see
:mod:`sparse_adv_fast.config`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, choice, flag, integer, number
from .methods import DEFAULT_ALPHA, METHODS
from .overfitting import OverfitDetector

OPTIMIZERS = ("sgd", "adam")
# "step" is the piecewise schedule of Madry et al. / Rice et al. (x0.1 at 50 % and 75 % of
# the epochs); "cyclic" is the one-cycle schedule of Wong et al. 2020 (0 -> lr at 2/5 of
# training -> 0, per iteration).
SCHEDULES = ("cosine", "step", "none", "cyclic")
NORMS = ("linf", "l2")
# Peak of the cyclic schedule, as a fraction of training (Wong et al. 2020).
CYCLIC_PEAK = 0.4


@dataclass(frozen=True)
class TrainConfig(Config):
    """The settings of a ``fit`` run (what a checkpoint records and a resume must match).

    Optimisation: ``method`` (``natural``, ``pgd``, ``trades``, ``fgsm_rs``), ``epochs``,
    ``lr`` (the peak for ``cyclic``), ``momentum``, ``weight_decay``, ``optimizer``,
    ``schedule`` (``cosine`` / ``step`` (x0.1 at 50 % and 75 %) / ``none``, stepped per
    epoch; ``cyclic``: per iteration, 0 -> ``lr`` at 40 % -> 0). Training attack: ``eps``,
    ``alpha`` (default ``eps / 4``, ``1.25 * eps`` for ``fgsm_rs``), ``steps``, ``beta``
    (TRADES), ``norm``; ``eps_warmup``: epochs (may be fractional) over which the radius
    (and the step, in proportion) ramps linearly from 0 to ``eps``, per iteration.
    Checks: ``co_check`` / ``co_ratio`` / ``co_drop`` (catastrophic overfitting, see
    ``fit``), ``collapse_check`` (stop at a collapse: training accuracy at chance for an
    epoch, or zero input gradients for most of a batch). Run shape: ``rewind_at``,
    ``max_batches``, ``val_batches``, ``val_steps``, ``seed``, ``val_on_test``.
    Data-parallel runs: ``sync_batchnorm`` turns the BatchNorm layers into
    ``SyncBatchNorm`` (statistics over the global batch; CUDA only, as in torch).
    """

    method: str = choice("natural", METHODS)
    epochs: int = integer(10, lo=0)
    lr: float = number(0.1, lo=0, lo_open=True)
    momentum: float = number(0.9, lo=0)
    weight_decay: float = number(5e-4, lo=0)
    optimizer: str = choice("sgd", OPTIMIZERS)
    schedule: str = choice("cosine", SCHEDULES)
    eps: float = number(8 / 255, lo=0)
    alpha: float | None = number(None, lo=0, lo_open=True, optional=True)
    steps: int = integer(10, lo=1)
    beta: float = number(6.0, lo=0)
    norm: str = choice("linf", NORMS)
    rewind_at: int | None = integer(None, lo=0, optional=True)
    co_check: bool = flag(True)
    max_batches: int | None = integer(None, lo=1, optional=True)
    val_batches: int = integer(2, lo=1)
    val_steps: int = integer(10, lo=1)
    co_ratio: float = number(0.5)
    co_drop: float = number(0.2)
    seed: int | None = integer(None, lo=0, optional=True)
    val_on_test: bool = flag(False)
    eps_warmup: float = number(0.0, lo=0)
    collapse_check: bool = flag(False)
    sync_batchnorm: bool = flag(False)

    def _validate(self) -> None:
        OverfitDetector(ratio=self.co_ratio, drop=self.co_drop)  # its own range checks

    @property
    def resolved_alpha(self) -> float:
        """``alpha``, or the method's default multiple of ``eps``."""
        return float(self.alpha if self.alpha is not None
                     else DEFAULT_ALPHA[self.method] * self.eps)


__all__ = ["CYCLIC_PEAK", "NORMS", "OPTIMIZERS", "SCHEDULES", "TrainConfig"]
