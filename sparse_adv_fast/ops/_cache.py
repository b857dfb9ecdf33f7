"""Per-weight cache of derived forms (masked dense weight, CSR, packed mask, ...).

Why validity is *scoped* rather than keyed by ``weight._version`` alone: ``w.data.copy_(t)``
and ``w.data = t`` (the lottery-ticket rewind idiom) rewrite a weight without bumping its
version, so no counter can tell that a form went stale. A form of a weight is therefore
reused only where nothing can have written the weight since it was built:

* inside :func:`frozen` (an attack: parameters frozen, many forwards over one weight) a form
  is built at its first use after entry and reused for the rest of the scope;
* otherwise a forward-direction request (anything outside autograd's backward pass) builds
  the form afresh and drops the weight's other forms, and the backward of that forward
  reuses them: one build per forward, like ``F.linear(x, w * mask)`` itself.

In both cases a change of the weight's identity, storage (``.data =``, ``.to()``,
``.half()``), dtype, shape, strides or version, or of the mask's identity, storage or version,
also invalidates. Forms of a mask alone (``w is mask``: density, CSR pattern, packed bits) are
keyed by that rule only: masks are written through the layer API or in-place ops, which bump
the version (a ``mask.data`` write is not seen); a mask unpacked from a packed one is keyed
by the packed tensor (:data:`SOURCE_ATTR`). Entries die with their weight (weakref), so
the cache never keeps memory alive on its own.

A masked layer :func:`own`\\ s its weight: the masked weight is then the stored weight itself,
zeroed in place at pruned positions (no copy, no memory) by :func:`zero_pruned_`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

_entries: dict[int, _Entry] = {}
# id(weight) -> nesting depth of the frozen() scopes covering it (the scope holds the tensor).
_frozen: dict[int, int] = {}
# id(weight) -> (weight, mask) weakrefs of the masked layer that owns the weight.
_owners: dict[int, tuple[weakref.ref, weakref.ref]] = {}
# id(weight) -> (weight weakref, {kind: (key, value)}): values kept for one frozen scope of
# the weight (see scoped), dropped when its outermost scope ends.
_scoped: dict[int, tuple[weakref.ref, dict[str, tuple[Any, Any]]]] = {}
# device type -> native in-place zeroing kernel registered by a backend (see zero_pruned_).
_zero_kernels: dict[str, Callable[[Tensor, Tensor], None]] = {}


# Attribute of a bool mask unpacked from a bit-packed one (nn.masked), naming the packed
# tensor: forms of the mask alone are keyed on that, so a fresh unpacked copy per forward
# does not rebuild them.
SOURCE_ATTR = "_saf_packed_source"


@dataclass
class Stats:
    """Counters the tests and benchmarks read: how often derived forms were rebuilt."""

    builds: int = 0
    hits: int = 0
    by_kind: Counter = field(default_factory=Counter)  # builds per form kind

    def reset(self) -> None:
        self.builds = self.hits = 0
        self.by_kind.clear()


stats = Stats()


@dataclass
class _Entry:
    wref: weakref.ref
    mref: weakref.ref
    key: tuple
    forms: dict[str, Any] = field(default_factory=dict)


def _key(w: Tensor, mask: Tensor) -> tuple | None:
    """Everything a write can change without touching the tensor's identity; None for
    tensors without addressable storage (fakes, functional wrappers): never cached."""
    try:
        return (w.data_ptr(), w.dtype, w.device, tuple(w.shape), w.stride(), w._version,
                mask.data_ptr(), mask.device, tuple(mask.shape), mask._version)
    except (RuntimeError, NotImplementedError):
        return None


def _forget(table: dict, key: int, ref: weakref.ref) -> None:
    """Weakref callback: drop ``table[key]`` if it still belongs to the dead tensor (a newer
    tensor may have reused the id)."""
    rec = table.get(key)
    if rec is not None and (rec.wref if isinstance(rec, _Entry) else rec[0]) is ref:
        del table[key]


def _entry(w: Tensor, mask: Tensor, key: tuple) -> _Entry:
    k = id(w)
    e = _entries.get(k)
    if e is None or e.wref() is not w or e.mref() is not mask or e.key != key:
        wref = weakref.ref(w, lambda r, k=k: _forget(_entries, k, r))
        e = _entries[k] = _Entry(wref, weakref.ref(mask), key)
    return e


def is_frozen(w: Tensor) -> bool:
    """Whether ``w`` is inside a :func:`frozen` scope (its forms are built once and reused)."""
    return id(w) in _frozen


def _reusable(w: Tensor) -> bool:
    """Whether forms of ``w`` built earlier may serve this request (see the module doc)."""
    return id(w) in _frozen or torch._C._current_graph_task_id() != -1


def get(w: Tensor, mask: Tensor, kind: str, build: Callable[[], Any]) -> Any:
    """The cached ``kind`` form of ``(w, mask)``, built by ``build()`` when stale.

    Callers are backend kernels that run below autograd; the form is built without grad.
    ``w is mask`` names a form of the mask alone.
    """
    if w is mask:  # an unpacked copy of a packed mask: key its forms on the packed one
        src = getattr(mask, SOURCE_ATTR, None)
        if src is not None:
            w = mask = src
    key = None if torch.compiler.is_compiling() else _key(w, mask)
    if key is None:
        return build()
    e = _entry(w, mask, key)
    if w is not mask and not _reusable(w):
        e.forms.clear()
    if kind in e.forms:
        stats.hits += 1
        return e.forms[kind]
    stats.builds += 1
    stats.by_kind[kind] += 1
    with torch.no_grad():  # cached forms feed kernels only; never hold an autograd graph
        val = build()
    e.forms[kind] = val
    return val


def scoped(w: Tensor, kind: str, key: Any, build: Callable[[], Any]) -> Any:
    """``build()``, kept and reused while ``w`` stays in a :func:`frozen` scope and ``key``
    is unchanged; built afresh on every call outside one. For attack-time copies a layer
    derives from its own state (a packed mask's bool form): the attack builds one, nothing
    holds it afterwards."""
    if id(w) not in _frozen or torch.compiler.is_compiling():
        return build()
    rec = _scoped.get(id(w))
    if rec is None or rec[0]() is not w:
        rec = _scoped[id(w)] = (weakref.ref(w), {})
    hit = rec[1].get(kind)
    if hit is not None and hit[0] == key:
        return hit[1]
    val = build()
    rec[1][kind] = (key, val)
    return val


def all_kept(mask: Tensor) -> bool:
    """Whether ``mask`` keeps every weight, cached per mask version."""
    return get(mask, mask, "all_kept", lambda: bool(mask.all()))


def register_zero_kernel(device_type: str, kernel: Callable[[Tensor, Tensor], None]) -> None:
    """Use ``kernel(t, mask)`` (``t *= mask`` in place for a contiguous ``t`` and contiguous
    bool ``mask``) for :func:`zero_pruned_` on ``device_type``. A backend registers its
    native kernel when it loads: torch's ``t.mul_(mask)`` first converts the whole mask to
    the weight's dtype, which costs more than the multiply."""
    _zero_kernels[device_type] = kernel


def zero_pruned_(w: Tensor, mask: Tensor) -> None:
    """Zero ``w`` in place where ``mask`` is False (``w *= mask``, as the oracle multiplies).

    Writes through ``w.data``, so the version is not bumped: a pending backward that saved
    ``w`` stays valid (it reads ``w`` only through the mask, and kept values are unchanged),
    and no masked form goes stale (pruned positions never enter one).
    """
    if not mask.numel() or all_kept(mask):
        return
    kernel = _zero_kernels.get(w.device.type)
    if kernel is not None and w.is_contiguous() and mask.is_contiguous():
        kernel(w.data, mask)
    else:
        w.data.mul_(mask)


def own(w: Tensor, mask: Tensor) -> None:
    """Record that ``w`` belongs to a masked layer with ``mask``: its masked form is ``w``
    itself, zeroed in place at pruned positions. Cheap when already recorded."""
    rec = _owners.get(id(w))
    if rec is not None and rec[0]() is w and rec[1]() is mask:
        return
    k = id(w)
    wref = weakref.ref(w, lambda r, k=k: _forget(_owners, k, r))
    _owners[k] = (wref, weakref.ref(mask))


def disown(w: Tensor) -> None:
    """Stop writing ``w`` in place (its layer gave it away, e.g. ``to_dense``)."""
    rec = _owners.get(id(w))
    if rec is not None and rec[0]() is w:
        del _owners[id(w)]


def _owned(w: Tensor, mask: Tensor) -> bool:
    rec = _owners.get(id(w))
    return rec is not None and rec[0]() is w and rec[1]() is mask


def masked_weight(w: Tensor, mask: Tensor) -> Tensor:
    """``w * mask``: an owned weight zeroed in place (and returned), else a cached product."""
    if torch.compiler.is_compiling():
        return w * mask
    if _owned(w, mask):
        get(w, mask, "masked_in_place", lambda: zero_pruned_(w, mask) or True)
        return w
    return get(w, mask, "masked", lambda: w * mask)


def _drop(w: Tensor) -> None:
    e = _entries.get(id(w))
    if e is not None and e.wref() is w:
        e.forms.clear()


@contextlib.contextmanager
def frozen(weights: nn.Module | Iterable[Tensor]) -> Iterator[None]:
    """Within this scope, reuse derived forms of ``weights`` across forwards.

    ``weights`` is a module (all its parameters) or an iterable of tensors. Forms are
    re-validated once at entry (dropped, so the first use rebuilds them from the weight as
    written then) and reused until exit; an attack's repeated forwards then do no mask work.
    The caller promises not to write the weights through ``.data`` inside the scope (any other
    in-place write, a ``.to()`` or a replacement is still seen). Attack entry points wrap
    their work in it (their parameters are frozen there anyway). Nesting is safe. Forms are
    dropped again when the outermost scope ends: outside it they would be rebuilt at the
    next use anyway, so keeping them would only hold memory.
    """
    ts = list(weights.parameters()) if isinstance(weights, nn.Module) else list(weights)
    for t in ts:
        _drop(t)
        _frozen[id(t)] = _frozen.get(id(t), 0) + 1
    try:
        yield
    finally:
        for t in ts:
            depth = _frozen.pop(id(t), 1) - 1
            if depth:
                _frozen[id(t)] = depth
            else:
                _drop(t)
                _scoped.pop(id(t), None)


def clear() -> None:
    """Drop every cached form."""
    _entries.clear()
    _scoped.clear()
