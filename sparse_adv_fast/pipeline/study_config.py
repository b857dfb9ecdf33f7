"""``StudyConfig``: every setting of a controlled study, one validated object (built on
:mod:`sparse_adv_fast.config`) for keywords, JSON/YAML files and ``key=value`` overrides.

Each field's check lives in its declaration; the cross-field checks (arms and their
dependencies, IWI pairs, the pruning schedule, the budget, the tuning grid, the attack
suites) run in ``_validate``. Both run at construction, before any work: an unknown key, an
unknown arm, an incompatible IWI pair or an unreachable pruning schedule is a one-line
``ValueError``.

Precedence in :func:`load`: defaults < config file < the ``quick`` preset (``--quick`` or
``"quick": true``) < overrides. ``lr_grid.<family>=0.05,0.1`` overrides one family.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import backends
from .. import config as C
from ..prune.hydra import LOSSES as HYDRA_LOSSES  # the score-phase losses
from ..train.config import TrainConfig
from . import arms as A

DEFAULT_EPS = {"digits": 0.1, "mnist": 0.3, "cifar10": 8 / 255}
AT_METHODS = ("pgd", "trades", "fgsm_rs")
HYDRA_SCOPES = ("layer", "global")
# Settings of the run, not of the result: a resumed run may change them.
RUN_ONLY = ("workers",)

QUICK: dict[str, Any] = {
    # ~1 minute on 2 CPU cores: one seed, one learning rate per family, tiny budgets.
    "seeds": (0,), "start_epochs": 1, "budget_epochs": 2, "imp_rounds": 1, "sparsity": None,
    "train_steps": 3, "lr_grid": {"at": (0.1,), "finetune": (0.05,)},
    "val_attacks": ("pgd10",), "eval_attacks": ("pgd20",), "test_subset": 200,
    "radius_points": 50,
}


def _model(name: Any) -> str:
    from .. import models

    return models.check_name(name)


def _names(field: str) -> Any:
    def check(v: Any) -> tuple[str, ...]:
        v = (v,) if isinstance(v, str) else v
        if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
            raise ValueError(f"{field} must be a list of names, got {v!r}")
        return tuple(v)
    return check


def _seeds(v: Any) -> tuple[int, ...]:
    from .stages import SEED_LIMIT

    v = (v,) if isinstance(v, int) and not isinstance(v, bool) else v
    if (not isinstance(v, (list, tuple)) or not v
            or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < SEED_LIMIT
                   for s in v)):
        raise ValueError(f"seeds must be a non-empty list of ints in [0, 2**32), got {v!r}")
    if len(set(v)) != len(v):
        raise ValueError(f"seeds must be distinct (they are paired across arms), got {list(v)}")
    return tuple(v)


_LR = C.field_check(TrainConfig, "lr")


def _grid(v: Any) -> dict[str, tuple[float, ...]]:
    if not isinstance(v, Mapping):
        raise ValueError(f"lr_grid must map a family {A.FAMILIES} to learning rates, got {v!r}")
    out = {}
    for fam, lrs in v.items():
        if fam not in A.FAMILIES:
            raise ValueError(f"lr_grid: unknown family {fam!r}; families are {A.FAMILIES}")
        lrs = (lrs,) if isinstance(lrs, (int, float)) and not isinstance(lrs, bool) else lrs
        if not isinstance(lrs, (list, tuple)) or not lrs:
            raise ValueError(f"lr_grid[{fam!r}] must be a non-empty list, got {v[fam]!r}")
        vals = tuple(_LR(f"lr_grid[{fam!r}] entry", x) for x in lrs)  # fit's own lr rule
        if len(set(vals)) != len(vals):
            raise ValueError(f"lr_grid[{fam!r}] repeats a learning rate: {list(vals)}")
        out[fam] = vals
    return out


@dataclass(frozen=True)
class StudyConfig(C.Config):
    """Every setting of a controlled study (``pipeline/arms.py`` has the budget rule).

    Data and model: ``dataset``, ``data_dir``, ``model``, ``batch_size``, ``val_size`` (training
    samples held out for validation: tuning never looks at test), ``train_subset``,
    ``test_subset``. Training: ``method`` (the AT loss of every adversarial segment), ``eps``
    (default per dataset), ``train_steps`` (attack steps), ``momentum``, ``weight_decay``,
    ``start_lr`` (the constant rate of the shared dense start). Budget: ``start_epochs`` (k),
    ``budget_epochs`` (B, after the start, the same for every arm), ``imp_rate``,
    ``imp_rounds`` (R), ``sparsity`` (the target of every pruning arm; default
    ``1 - (1 - rate)^R``). Arms: ``arms``, ``widen`` (w), ``iwi_ticket_source``,
    ``iwi_widen_source``, ``hydra_scope``, ``hydra_loss`` (the loss HYDRA's scores train on,
    ``pgd`` or ``trades``), ``hydra_score_lr``. Tuning:
    ``lr_grid`` (family -> learning rates; each arm is tuned on its family's grid by
    validation robust accuracy on the first seed). Evaluation: ``val_attacks``,
    ``eval_attacks`` (suite names of ``saf.train.evaluate``; the worst case is the metric),
    ``level`` (interval coverage), ``radius_points`` (test points on which the first-order
    radius is checked against FAB's minimal perturbation; 0: off). ``seeds`` are paired
    across arms. ``backend``: the
    masked-op backend of every job (``saf.backends.using``); a fixed one, not ``"auto"``
    (chosen by timing, which can differ between processes), keeps resumed and parallel runs
    bit-identical, and the torch reference is the fastest on small CPU models.
    ``workers``: parallel job processes (a run setting; results do not depend on it).
    """

    dataset: str = C.choice("digits", tuple(DEFAULT_EPS))
    data_dir: str | None = C.text(None, optional=True)
    model: str = C.checked("small_cnn", _model, kind="str")
    method: str = C.choice("pgd", AT_METHODS)
    eps: float | None = C.number(None, lo=0, hi=1, optional=True)  # inputs live in [0, 1]
    train_steps: int = C.like(TrainConfig, "steps")
    batch_size: int = C.integer(128, lo=1)
    val_size: int = C.integer(180, lo=1)
    train_subset: int | None = C.integer(None, lo=1, optional=True)
    test_subset: int | None = C.integer(None, lo=1, optional=True)
    momentum: float = C.like(TrainConfig, "momentum")
    weight_decay: float = C.like(TrainConfig, "weight_decay")
    seeds: tuple[int, ...] = C.checked((0, 1, 2), _seeds)
    arms: tuple[str, ...] = C.checked(A.ARM_NAMES, _names("arms"))
    start_epochs: int = C.integer(1, lo=1)
    start_lr: float = C.like(TrainConfig, "lr", 0.1)
    budget_epochs: int = C.integer(10, lo=1)
    imp_rate: float = C.number(0.2, lo=0, hi=1, lo_open=True, hi_open=True)
    imp_rounds: int = C.integer(4, lo=1)
    sparsity: float | None = C.number(None, lo=0, hi=1, lo_open=True, hi_open=True,
                                      optional=True)
    widen: int = C.integer(2, lo=2)
    iwi_ticket_source: str = C.text("imp")
    iwi_widen_source: str = C.text("dense_at")
    hydra_scope: str = C.choice("layer", HYDRA_SCOPES)
    hydra_loss: str = C.choice("pgd", HYDRA_LOSSES)
    hydra_score_lr: float = C.number(0.1, lo=0, lo_open=True)
    lr_grid: dict[str, tuple[float, ...]] = C.checked(
        {"at": (0.05, 0.1), "finetune": (0.02, 0.05)}, _grid)
    val_attacks: tuple[str, ...] = C.checked(("pgd20",), _names("val_attacks"))
    eval_attacks: tuple[str, ...] = C.checked(("pgd20x5", "apgd"), _names("eval_attacks"))
    level: float = C.number(0.95, lo=0, hi=1, lo_open=True, hi_open=True)
    radius_points: int = C.integer(100, lo=0)
    backend: str = C.choice("torch", (*backends.NAMES, "auto"))
    workers: int = C.integer(2, lo=1)
    quick: bool = C.flag(False)

    def _validate(self) -> None:
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", os.fspath(self.data_dir))
        A.check_arms(self.arms, self.iwi_ticket_source, self.iwi_widen_source, self.widen)
        A.imp_sparsities(self.imp_rate, self.imp_rounds, self.sparsity)
        A.segment_epochs(self.budget_epochs, self.imp_rounds)
        for fam in A.FAMILIES:
            needed = [a for a in self.arms if A.ARMS[a].family == fam]
            if needed and fam not in self.lr_grid:
                raise ValueError(f"lr_grid has no {fam!r} family, needed by arms {needed}")
        for name in ("val_attacks", "eval_attacks"):
            _check_attacks(name, getattr(self, name), self.resolved_eps)

    # -- views ------------------------------------------------------------------------------
    @property
    def resolved_eps(self) -> float:
        """``eps``, or the dataset's default radius."""
        return DEFAULT_EPS[self.dataset] if self.eps is None else float(self.eps)

    @property
    def sparsities(self) -> tuple[float, ...]:
        """The per-round IMP sparsities; the last is the target of every pruning arm."""
        return A.imp_sparsities(self.imp_rate, self.imp_rounds, self.sparsity)

    @property
    def segment(self) -> int:
        """``L``: epochs of one IMP round and of every arm's final segment."""
        return A.segment_epochs(self.budget_epochs, self.imp_rounds)

    def identity(self) -> dict[str, Any]:
        """The settings a result depends on (run-only ones such as ``workers`` left out)."""
        d = self.as_dict()
        for k in RUN_ONLY:
            d.pop(k)
        return d

    def family_grid(self, arm: str) -> tuple[float, ...]:
        """The learning rates ``arm`` is tuned over."""
        return tuple(self.lr_grid[A.ARMS[arm].family])


def _check_attacks(name: str, names: tuple[str, ...], eps: float) -> None:
    if not names:
        raise ValueError(f"{name} must name at least one attack")
    # The evaluator's own parser, so new suites (e.g. "autoattack") are accepted as they land.
    import torch

    from ..attacks.evaluate import suite

    probe = torch.nn.Linear(1, 2)
    for n in names:
        try:
            suite(n.lower(), probe, eps=eps)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict, typed from the fields (``sparse_adv_fast.config``):
    ``seeds=0,1,2``, ``arms=dense_at,imp``, ``eps=0.2``, ``data_dir=null``, JSON otherwise;
    plus ``lr_grid.<family>=0.05,0.1`` for one family of the grid."""
    plain, grid = [], {}
    for item in items:
        key = item.partition("=")[0].strip() if isinstance(item, str) else ""
        top, dot, fam = key.partition(".")
        if not dot:
            plain.append(item)
            continue
        C.check_keys([top], StudyConfig.keys(), "override")
        if top != "lr_grid":
            raise ValueError(f"override {item!r}: only lr_grid has sub-keys "
                             "(lr_grid.<family>=...)")
        grid[fam] = C.coerce(tuple[float, ...], item.partition("=")[2], key)
    out = C.parse_overrides(plain, StudyConfig)
    if grid:
        out["lr_grid"] = {**out.get("lr_grid", {}), **grid}
    return out


def load(path: str | os.PathLike[str] | None = None,
         overrides: Iterable[str] | Mapping[str, Any] = (), *, quick: bool = False
         ) -> StudyConfig:
    """The study config from ``path`` (JSON, or YAML with PyYAML; ``None``: the defaults),
    the ``quick`` preset and ``overrides`` (``key=value`` strings or a dict), validated once.
    A grid override replaces the families it names and keeps the others."""
    d: dict[str, Any] = {}
    where = "config"
    if path is not None:
        d.update(C.read_file(path, StudyConfig.keys()))
        where = os.fspath(path)
    if quick or d.get("quick") is True:
        d.update(QUICK, quick=True)
    ov = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    C.check_keys(ov, StudyConfig.keys(), "override")
    grid = ov.pop("lr_grid", None)
    d.update(ov)
    if isinstance(grid, Mapping):
        base = d.get("lr_grid", StudyConfig.__dataclass_fields__["lr_grid"].default_factory())
        d["lr_grid"] = {**base, **grid}
    elif grid is not None:
        d["lr_grid"] = grid
    return StudyConfig.from_dict(d, where)


__all__ = ["DEFAULT_EPS", "QUICK", "StudyConfig", "load", "parse_overrides"]
