"""The study's one validated config object, loaded from JSON files and ``key=value`` overrides.

``StudyConfig(**kw)``, :func:`load` (a JSON file, ``--quick`` and CLI-style overrides) and
``StudyConfig.from_dict`` all go through the same checks, so a keyword, a file key and an
override are one thing with one check. Every check runs at construction, before any work:
an unknown key, an unknown arm, an incompatible IWI pair or an unreachable pruning
schedule is a one-line ``ValueError``.

Precedence: defaults < config file < the ``quick`` preset (``--quick`` or ``"quick": true``)
< overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import arms as A

DEFAULT_EPS = {"digits": 0.1, "mnist": 0.3, "cifar10": 8 / 255}
AT_METHODS = ("pgd", "trades", "fgsm_rs")
HYDRA_SCOPES = ("layer", "global")
HYDRA_LOSSES = ("pgd",)
# Settings of the run, not of the result: a resumed run may change them.
RUN_ONLY = ("workers",)

QUICK: dict[str, Any] = {
    # ~1 minute on 2 CPU cores: one seed, one learning rate per family, tiny budgets.
    "seeds": (0,), "start_epochs": 1, "budget_epochs": 2, "imp_rounds": 1, "sparsity": None,
    "train_steps": 3, "lr_grid": {"at": (0.1,), "finetune": (0.05,)},
    "val_attacks": ("pgd10",), "eval_attacks": ("pgd20",), "test_subset": 200,
}


def _default_grid() -> dict[str, tuple[float, ...]]:
    return {"at": (0.05, 0.1), "finetune": (0.02, 0.05)}


@dataclass(frozen=True)
class StudyConfig:
    """Every setting of a controlled study (see ``pipeline/arms.py`` for the budget rule).

    Data and model: ``dataset``, ``data_dir``, ``model``, ``batch_size``, ``val_size`` (training
    samples held out for validation: tuning never looks at test), ``train_subset``,
    ``test_subset``. Training: ``method`` (the AT loss of every adversarial segment), ``eps``
    (default per dataset), ``train_steps`` (attack steps), ``momentum``, ``weight_decay``,
    ``start_lr`` (the constant rate of the shared dense start). Budget: ``start_epochs`` (k),
    ``budget_epochs`` (B, after the start, the same for every arm), ``imp_rate``,
    ``imp_rounds`` (R), ``sparsity`` (the target of every pruning arm; default
    ``1 - (1 - rate)^R``). Arms: ``arms``, ``widen`` (w), ``iwi_ticket_source``,
    ``iwi_widen_source``, ``hydra_scope``, ``hydra_loss``, ``hydra_score_lr``. Tuning:
    ``lr_grid`` (family -> learning rates; each arm is tuned on its family's grid by
    validation robust accuracy on the first seed). Evaluation: ``val_attacks``,
    ``eval_attacks`` (suite names of ``saf.train.evaluate``; the worst case is the metric),
    ``level`` (interval coverage). ``seeds`` are paired across arms. ``backend``: the
    masked-op backend of every job (``saf.backends.using``); a fixed one, not ``"auto"``
    (chosen by timing, which can differ between processes), keeps resumed and parallel runs
    bit-identical, and the torch reference is the fastest on small CPU models.
    ``workers``: parallel job processes (a run setting; results do not depend on it).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "small_cnn"
    method: str = "pgd"
    eps: float | None = None
    train_steps: int = 10
    batch_size: int = 128
    val_size: int = 180
    train_subset: int | None = None
    test_subset: int | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = A.ARM_NAMES
    start_epochs: int = 1
    start_lr: float = 0.1
    budget_epochs: int = 10
    imp_rate: float = 0.2
    imp_rounds: int = 4
    sparsity: float | None = None
    widen: int = 2
    iwi_ticket_source: str = "imp"
    iwi_widen_source: str = "dense_at"
    hydra_scope: str = "layer"
    hydra_loss: str = "pgd"
    hydra_score_lr: float = 0.1
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=_default_grid)
    val_attacks: tuple[str, ...] = ("pgd20",)
    eval_attacks: tuple[str, ...] = ("pgd20x5", "apgd")
    level: float = 0.95
    backend: str = "torch"
    workers: int = 2
    quick: bool = False

    def __post_init__(self) -> None:
        _validate(self)

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

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def identity(self) -> dict[str, Any]:
        """The settings a result depends on (run-only ones such as ``workers`` left out)."""
        d = self.as_dict()
        for k in RUN_ONLY:
            d.pop(k)
        return d

    def family_grid(self, arm: str) -> tuple[float, ...]:
        """The learning rates ``arm`` is tuned over."""
        return tuple(self.lr_grid[A.ARMS[arm].family])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> StudyConfig:
        """A config from a dict; an unknown key is a one-line ValueError naming ``where``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: a study config must be a JSON object, got "
                             f"{type(d).__name__}")
        check_keys(d, where)
        return cls(**dict(d))


# ---- validation ---------------------------------------------------------------------------
_FIELDS = {f.name: f for f in dataclasses.fields(StudyConfig)}


def check_keys(d: Iterable[str], where: str = "config") -> None:
    """ValueError for the first key that is not a StudyConfig field (with a close match)."""
    for k in d:
        if k not in _FIELDS:
            close = difflib.get_close_matches(str(k), list(_FIELDS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown config key {k!r}{hint} (known keys: "
                             f"{', '.join(_FIELDS)})")


def _set(cfg: StudyConfig, name: str, value: Any) -> None:
    object.__setattr__(cfg, name, value)  # normalising a frozen dataclass's own fields


def _int(name: str, v: Any, lo: int, optional: bool = False) -> None:
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}{' or null' if optional else ''}, "
                         f"got {v!r}")


def _num(name: str, v: Any, lo: float, hi: float | None = None, optional: bool = False,
         open_lo: bool = True) -> None:
    if optional and v is None:
        return
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    ok = ok and (v > lo if open_lo else v >= lo) and (hi is None or v < hi)
    if not ok:
        rng = f"in ({lo:g}, {hi:g})" if hi is not None else f"{'>' if open_lo else '>='} {lo:g}"
        raise ValueError(f"{name} must be a number {rng}{' or null' if optional else ''}, "
                         f"got {v!r}")


def _choice(name: str, v: Any, choices: tuple[str, ...]) -> None:
    if v not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {v!r}")


def _str_tuple(cfg: StudyConfig, name: str) -> tuple[str, ...]:
    v = getattr(cfg, name)
    if isinstance(v, str):
        v = (v,)
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        raise ValueError(f"{name} must be a list of names, got {v!r}")
    _set(cfg, name, tuple(v))
    return tuple(v)


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


def _validate(c: StudyConfig) -> None:
    _choice("dataset", c.dataset, tuple(DEFAULT_EPS))
    from .. import models

    models.check_name(c.model)
    _choice("method", c.method, AT_METHODS)
    if c.data_dir is not None:
        _set(c, "data_dir", os.fspath(c.data_dir))
    _num("eps", c.eps, 0.0, optional=True)
    for name, lo in (("train_steps", 1), ("batch_size", 1), ("val_size", 1),
                     ("start_epochs", 1), ("budget_epochs", 1), ("imp_rounds", 1),
                     ("widen", 2), ("workers", 1)):
        _int(name, getattr(c, name), lo)
    _int("train_subset", c.train_subset, 1, optional=True)
    _int("test_subset", c.test_subset, 1, optional=True)
    _num("momentum", c.momentum, 0.0, open_lo=False)
    _num("weight_decay", c.weight_decay, 0.0, open_lo=False)
    _num("start_lr", c.start_lr, 0.0)
    _num("hydra_score_lr", c.hydra_score_lr, 0.0)
    _num("imp_rate", c.imp_rate, 0.0, 1.0)
    _num("sparsity", c.sparsity, 0.0, 1.0, optional=True)
    _num("level", c.level, 0.0, 1.0)
    _choice("hydra_scope", c.hydra_scope, HYDRA_SCOPES)
    from .. import backends

    _choice("backend", c.backend, (*backends.NAMES, "auto"))
    if c.hydra_loss == "trades":
        raise ValueError("hydra_loss='trades' is not available: saf.prune.hydra trains the "
                         "scores on the cross-entropy of attacked inputs only; use 'pgd'")
    _choice("hydra_loss", c.hydra_loss, HYDRA_LOSSES)
    if not isinstance(c.quick, bool):
        raise ValueError(f"quick must be true or false, got {c.quick!r}")
    seeds = c.seeds
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = (seeds,)
    if (not isinstance(seeds, (list, tuple)) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise ValueError(f"seeds must be a non-empty list of ints >= 0, got {c.seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct (they are paired across arms), got {seeds}")
    _set(c, "seeds", tuple(seeds))
    arms = _str_tuple(c, "arms")
    A.check_arms(arms, c.iwi_ticket_source, c.iwi_widen_source, c.widen)
    # Schedule and budget (raise the unreachable / too-small messages).
    A.imp_sparsities(c.imp_rate, c.imp_rounds, c.sparsity)
    A.segment_epochs(c.budget_epochs, c.imp_rounds)
    grid = c.lr_grid
    if not isinstance(grid, Mapping):
        raise ValueError(f"lr_grid must map a family {A.FAMILIES} to learning rates, got {grid!r}")
    extra = sorted(set(grid) - set(A.FAMILIES))
    if extra:
        raise ValueError(f"lr_grid: unknown family {extra[0]!r}; families are {A.FAMILIES}")
    norm: dict[str, tuple[float, ...]] = {}
    for fam in A.FAMILIES:
        needed = [a for a in arms if A.ARMS[a].family == fam]
        if fam not in grid:
            if needed:
                raise ValueError(f"lr_grid has no {fam!r} family, needed by arms {needed}")
            continue
        lrs = grid[fam]
        lrs = (lrs,) if isinstance(lrs, (int, float)) and not isinstance(lrs, bool) else lrs
        if not isinstance(lrs, (list, tuple)) or not lrs:
            raise ValueError(f"lr_grid[{fam!r}] must be a non-empty list, got {grid[fam]!r}")
        for v in lrs:
            _num(f"lr_grid[{fam!r}] entry", v, 0.0)
        if len(set(lrs)) != len(lrs):
            raise ValueError(f"lr_grid[{fam!r}] repeats a learning rate: {list(lrs)}")
        norm[fam] = tuple(float(v) for v in lrs)
    _set(c, "lr_grid", norm)
    for name in ("val_attacks", "eval_attacks"):
        _check_attacks(name, _str_tuple(c, name), c.resolved_eps)


# ---- files and overrides ------------------------------------------------------------------


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path`` (keys checked); a clear ValueError if it is not one."""
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        raise ValueError(f"{p}: study configs are JSON files (YAML would need PyYAML as a "
                         "dependency); convert it to .json")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"study config {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: a study config must be a JSON object, got {type(d).__name__}")
    check_keys(d, str(p))
    return d


def _parse_value(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    f = _FIELDS.get(name)
    # Bare comma lists for list-valued keys: arms=dense_at,imp  seeds=0,1,2
    if f is not None and "tuple" in str(f.type):
        parts = [s.strip() for s in text.split(",") if s.strip()]
        return [json.loads(s) if _is_json(s) else s for s in parts]
    return text


def _is_json(s: str) -> bool:
    try:
        json.loads(s)
    except json.JSONDecodeError:
        return False
    return True


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict. Values are JSON (``seeds=[0,1]``, ``eps=0.2``,
    ``data_dir=null``), else a bare string or comma list; ``lr_grid.at=0.05,0.1`` sets one
    family. A malformed item or unknown key is a one-line ValueError."""
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, _, text = item.partition("=")
        key = key.strip()
        top, _, sub = key.partition(".")
        check_keys([top], "override")
        if sub:
            if top != "lr_grid":
                raise ValueError(f"override {item!r}: only lr_grid has sub-keys "
                                 f"(lr_grid.<family>=...)")
            vals = _parse_value("lr_grid_family", text)
            if isinstance(vals, str):
                vals = [json.loads(s) if _is_json(s) else s for s in vals.split(",")]
            out.setdefault("lr_grid", {})[sub] = vals
        else:
            out[top] = _parse_value(top, text)
    return out


def load(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] | Mapping[str, Any]
         = (), *, quick: bool = False) -> StudyConfig:
    """The study config from ``path`` (JSON; ``None``: the defaults), the ``quick`` preset
    and ``overrides`` (``key=value`` strings or a dict), validated once."""
    d: dict[str, Any] = {}
    if path is not None:
        d.update(read_file(path))
    quick = quick or bool(d.get("quick", False))
    if quick:
        d.update(QUICK, quick=True)
    ov = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    check_keys(ov, "override")
    grid = ov.pop("lr_grid", None)
    d.update(ov)
    if grid is not None:
        # A dotted override replaces one family; keep the others.
        base = dict(d.get("lr_grid", _default_grid()))
        base.update(grid)
        d["lr_grid"] = base
    return StudyConfig.from_dict(d)


__all__ = ["DEFAULT_EPS", "QUICK", "StudyConfig", "check_keys", "load", "parse_overrides",
           "read_file"]
