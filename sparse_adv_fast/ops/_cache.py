"""Per-weight cache of derived forms (masked dense weight, CSR, packed mask, ...).

An entry is keyed by the identity of the weight tensor and is valid while the weight's
and the mask's ``_version`` counters are unchanged: a PGD attack's many forwards over the
same weights then do no mask work, and any in-place update (optimizer step, pruning,
``load_state_dict``) invalidates it. Entries die with their weight (weakref), so the cache
never keeps memory alive on its own.

A layer whose stored weight is already exactly zero at pruned positions says so with
:func:`mark_masked`; the masked weight is then the weight itself (no copy, no memory).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

_entries: dict[int, _Entry] = {}


@dataclass
class Stats:
    """Counters the tests and benchmarks read: how often derived forms were rebuilt."""

    builds: int = 0
    hits: int = 0

    def reset(self) -> None:
        self.builds = self.hits = 0


stats = Stats()


@dataclass
class _Entry:
    wref: weakref.ref
    mref: weakref.ref
    wver: int
    mver: int
    forms: dict[str, Any] = field(default_factory=dict)


def _versions(w: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    return w._version, mask._version


def _entry(w: torch.Tensor, mask: torch.Tensor) -> _Entry:
    key = id(w)
    e = _entries.get(key)
    wv, mv = _versions(w, mask)
    if e is None or e.wref() is not w or e.mref() is not mask or (e.wver, e.mver) != (wv, mv):
        wref = weakref.ref(w, lambda _r, k=key: _entries.pop(k, None))
        e = _Entry(wref, weakref.ref(mask), wv, mv)
        _entries[key] = e
    return e


def get(w: torch.Tensor, mask: torch.Tensor, kind: str, build: Callable[[], Any]) -> Any:
    """The cached ``kind`` form of ``(w, mask)``, built by ``build()`` when stale.

    Callers are backend kernels that run below autograd; the form is built without grad.
    """
    if torch.compiler.is_compiling():
        return build()
    e = _entry(w, mask)
    if kind in e.forms:
        stats.hits += 1
        return e.forms[kind]
    stats.builds += 1
    with torch.no_grad():  # cached forms feed kernels only; never hold an autograd graph
        val = build()
    e.forms[kind] = val
    return val


def mark_masked(w: torch.Tensor, mask: torch.Tensor) -> None:
    """Record that ``w`` is exactly zero wherever ``mask`` is False, at current versions."""
    e = _entry(w, mask)
    e.forms["masked_is_weight"] = True


def masked_weight(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``w * mask``: the weight itself when marked masked, else a cached product."""
    # _entry() drops a stale entry, so the mark is valid only at the versions it was set.
    if not torch.compiler.is_compiling() and _entry(w, mask).forms.get("masked_is_weight"):
        stats.hits += 1
        return w
    return get(w, mask, "masked", lambda: w * mask)


def clear() -> None:
    """Drop every cached form."""
    _entries.clear()
