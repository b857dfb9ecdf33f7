"""The configs of the ``train``, ``prune`` and ``iwi`` commands: one object per command,
shared by its config file (``--config FILE``, JSON or YAML) and its CLI flags.

A flag and a file key are the same field with the same check: the CLI derives each flag's
argparse type from the field (:func:`sparse_adv_fast.config.arg_type`) and a file is read
into the same dataclass. The training settings reuse the checks of
:class:`~sparse_adv_fast.train.TrainConfig` (:func:`~sparse_adv_fast.config.like`); the
few a command restricts further (at least one epoch; an L-inf radius in [0, 1], since
inputs are) say so in their own words. Precedence: defaults < file < flags.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

from ..config import Config, checked, choice, flag, integer, like, number, text
from ..train.config import TrainConfig

DATASETS = ("digits", "mnist", "cifar10")
MODELS = ("small_cnn", "mlp", "vgg16", "resnet18")
TRAIN_METHODS = ("natural", "pgd", "trades", "fgsm_rs")
PRUNE_METHODS = ("magnitude", "imp", "hydra", "random")
IWI_MODES = ("ticket", "widen")
IWI_INITS = ("zero", "noise", "preserve")
# TrainConfig fields a command passes through unchanged (flag --name-with-dashes).
FIT_PASSTHROUGH = ("momentum", "weight_decay", "optimizer", "schedule", "alpha", "beta",
                   "eps_warmup", "collapse_check", "sync_batchnorm")
_POS_INT = "expected a positive integer"


def _seed(v: Any) -> int:
    from .stages import check_seed

    return check_seed(v)


def _width(v: Any) -> float:
    from ..models import check_width

    return check_width(v)


@dataclass(frozen=True)
class FitOptions(Config):
    """Settings every training command shares (see ``TrainConfig`` for each fit field).

    ``augment``: random crop + flip of the training batches (default: on for cifar10).
    ``collapse_check`` is on for the commands: a run that is not learning stops with a
    message saying what to try.
    """

    epochs: int = integer(10, lo=1, msg=_POS_INT)
    eps: float | None = number(None, lo=0, hi=1, optional=True,
                               msg="eps must be in [0, 1] (inputs are in [0, 1])")
    lr: float = number(0.05, lo=0, lo_open=True, msg="expected a positive number")
    steps: int = integer(10, lo=1, msg=_POS_INT)
    batch_size: int = integer(64, lo=1, msg=_POS_INT)
    seed: int = checked(0, _seed)
    data_dir: str | None = text(None, optional=True)
    augment: bool | None = flag(None, optional=True)
    momentum: float = like(TrainConfig, "momentum")
    weight_decay: float = like(TrainConfig, "weight_decay")
    optimizer: str = like(TrainConfig, "optimizer")
    schedule: str = like(TrainConfig, "schedule")
    alpha: float | None = like(TrainConfig, "alpha")
    beta: float = like(TrainConfig, "beta")
    eps_warmup: float = like(TrainConfig, "eps_warmup")
    collapse_check: bool = like(TrainConfig, "collapse_check", default=True)
    sync_batchnorm: bool = like(TrainConfig, "sync_batchnorm")

    def fit_settings(self) -> dict[str, Any]:
        """The pass-through ``TrainConfig`` fields (the command resolves the others)."""
        return {k: getattr(self, k) for k in FIT_PASSTHROUGH}



@dataclass(frozen=True)
class TrainCommand(FitOptions):
    """``sparse-adv-fast train``."""

    dataset: str = choice("digits", DATASETS)
    model: str = choice("small_cnn", MODELS)
    width: float = checked(1, _width)
    method: str = choice("pgd", TRAIN_METHODS)


@dataclass(frozen=True)
class PruneCommand(FitOptions):
    """``sparse-adv-fast prune`` (``method``: the pruning; ``train_method``: its training)."""

    method: str = choice("magnitude", PRUNE_METHODS)
    sparsity: float = number(0.9, lo=0, hi=1, hi_open=True)
    scope: str = choice("global", ("global", "layer"))
    rounds: int = integer(3, lo=1, msg=_POS_INT)
    train_method: str = choice("pgd", TRAIN_METHODS)


@dataclass(frozen=True)
class IwiCommand(FitOptions):
    """``sparse-adv-fast iwi``."""

    mode: str = choice("ticket", IWI_MODES)
    width: float | None = checked(None, _width, optional=True)
    init: str | None = choice(None, IWI_INITS, optional=True)
    method: str = choice("pgd", TRAIN_METHODS)


COMMANDS: dict[str, type[FitOptions]] = {
    "train": TrainCommand, "prune": PruneCommand, "iwi": IwiCommand,
}


def versions() -> dict[str, str]:
    """Versions a run's result depends on, saved with its resolved config (commands and
    studies alike)."""
    import importlib.metadata

    import torch

    from .. import __version__

    out = {"sparse_adv_fast": __version__, "torch": torch.__version__,
           "python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("numpy", "scikit-learn", "matplotlib"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


__all__ = ["COMMANDS", "FIT_PASSTHROUGH", "FitOptions", "IwiCommand", "PruneCommand",
           "TrainCommand", "versions"]
