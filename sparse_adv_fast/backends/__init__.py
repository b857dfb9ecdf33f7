"""Backend registry: which implementation runs an op for a given call.

``auto`` (the default) decides **by measurement** (:mod:`._autotune`): for each op,
direction, shape, density bucket, dtype, device and thread count it times the candidates
once — the torch reference on the cached masked weight (oneDNN / BLAS / cuBLAS / cuDNN),
``cpp-sparse`` on CPU, ``cuda`` and ``triton`` on CUDA — and keeps the winner in memory and
in a per-machine file. The rule: never anything slower than the torch reference, and a
kernel never measured on a device is never preferred there over cuBLAS/cuDNN.

``SPARSE_ADV_FAST_AUTOTUNE=0`` switches measuring off: the static rule then runs, ``cpp``
(dense BLAS above fixed density thresholds, CSR kernels below) for CPU tensors and the
torch reference for CUDA tensors. The static rule also covers calls that must not be timed
(under torch.compile tracing, fake tensors, CUDA graph capture, empty batches) until a
measurement exists. (``triton`` runs CPU tensors under ``TRITON_INTERPRET=1``, only when
forced.)

``SPARSE_ADV_FAST_BACKEND`` or :func:`use` forces one backend: a forced backend that
cannot run raises :class:`BackendUnavailable` with the reason. In ``auto`` mode a backend
that fails to load is skipped with a single log line.

Nothing here imports triton, compiles, or touches CUDA at import time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _autotune
from . import cpp as _cpp
from . import cuda as _cuda
from . import triton as _triton

NAMES = ("torch", "cpp", "triton", "cuda")
_ENV = "SPARSE_ADV_FAST_BACKEND"
_log = logging.getLogger("sparse_adv_fast")
_forced: str | None = None
_warned: set[tuple[str, str]] = set()
_env_seen: tuple[str, str] = ("", "auto")  # (raw SPARSE_ADV_FAST_BACKEND, parsed)
_resolved: dict[tuple[str, str, str, bool], tuple[str, Any]] = {}
_chosen: dict[_autotune.Key, str] = {}  # auto's decisions in this process
_candidates_memo: dict[tuple[str, str], dict[str, Any]] = {}
_autos: dict[tuple[str, str, int], _Auto] = {}
_disk: dict[str, Any] = {"path": None, "records": {}}


class BackendUnavailable(RuntimeError):
    """An explicitly chosen backend cannot run; the message says why."""


def _check_name(name: str) -> str:
    name = name.strip().lower()
    if name not in (*NAMES, "auto"):
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join((*NAMES, 'auto'))}")
    return name


def use(name: str) -> None:
    """Force ``name`` for every op (``"auto"`` restores automatic choice)."""
    global _forced
    name = _check_name(name)
    _forced = None if name == "auto" else name


@contextlib.contextmanager
def using(name: str) -> Iterator[None]:
    """Context manager form of :func:`use`; restores the previous choice on exit."""
    global _forced
    prev = _forced
    use(name)
    try:
        yield
    finally:
        _forced = prev


def current() -> str:
    """The forced backend name, or ``"auto"``."""
    global _env_seen
    if _forced is not None:
        return _forced
    raw = os.environ.get(_ENV, "")
    if raw != _env_seen[0]:  # parse once per value: ops ask on every call
        env = raw.strip()
        _env_seen = (raw, _check_name(env) if env else "auto")
    return _env_seen[1]


def _reason(name: str, device: torch.device | None = None) -> str | None:
    """Why ``name`` cannot run (on ``device`` if given), or None when it can."""
    if name == "torch":
        return None
    if name == "cpp":
        if device is not None and device.type != "cpu":
            return f"the cpp backend runs CPU tensors only, got {device.type}"
        return _cpp.unavailable_reason()
    if name == "triton":
        if device is not None and device.type == "cpu" and not _triton.interpreting():
            return "triton runs CPU tensors only under TRITON_INTERPRET=1"
        return _triton.unavailable_reason(need_gpu=device is None or device.type != "cpu")
    if name == "cuda":
        if device is not None and device.type != "cuda":
            return f"the cuda backend runs CUDA tensors only, got {device.type}"
        return _cuda.unavailable_reason()
    raise ValueError(f"unknown backend {name!r}")


def available() -> dict[str, bool | str]:
    """Each backend mapped to ``True`` or the reason it is not available here."""
    return {n: (_reason(n) or True) for n in NAMES}


def _module(name: str):
    return {"cpp": _cpp, "triton": _triton, "cuda": _cuda}[name]


def resolve(op: str, device: torch.device) -> tuple[str, Any]:
    """The forced backend for ``op`` on ``device``, or in ``auto`` mode the static rule.

    Returns ``(name, impl)`` where ``impl`` is a namespace with the op's backend functions
    (names fixed by ``sparse_adv_fast/ops/<op>.py``), or ``("torch", None)``. The choice
    is remembered per (op, device type, forced backend). Ops dispatch through :func:`impl`,
    which in ``auto`` mode measures per call signature instead.
    """
    forced = current()
    key = (op, device.type, forced, _triton.interpreting())
    hit = _resolved.get(key)
    if hit is None:
        hit = _resolved[key] = _resolve(op, device, forced)
    return hit


def reset() -> None:
    """Forget remembered choices, measurements held in memory and logged fallbacks (after
    installing a compiler, say). The dispatch cache file is kept: see :func:`clear_cache`."""
    _resolved.clear()
    _warned.clear()
    _chosen.clear()
    _candidates_memo.clear()
    _autos.clear()
    _disk["path"] = None
    _disk["records"] = {}


def clear_cache() -> None:
    """Delete this machine's dispatch cache file and forget every measurement."""
    reset()
    with contextlib.suppress(FileNotFoundError):
        _autotune.cache_path().unlink()


def _log_skip(name: str, op: str, why: str) -> None:
    key = (name, op)
    if key not in _warned:
        _warned.add(key)
        _log.info("sparse_adv_fast: %s backend skipped for %s (%s)", name, op, why)


def _resolve(op: str, device: torch.device, forced: str) -> tuple[str, Any]:
    if forced != "auto":
        if forced == "torch":
            return "torch", None
        why = _reason(forced, device)
        if why is None:
            try:
                return forced, _module(forced).loader(op)
            except Exception as e:  # build or import failure
                why = f"{type(e).__name__}: {e}"
        raise BackendUnavailable(f"backend {forced!r} cannot run {op} on {device}: {why}")
    # Static rule: on CUDA nothing unmeasured beats cuBLAS/cuDNN, so the torch reference.
    if device.type != "cpu":
        return "torch", None
    why = _reason("cpp", device)
    if why is None:
        try:
            return "cpp", _cpp.loader(op)
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
    _log_skip("cpp", op, why)
    return "torch", None


# ---- auto: dispatch by measurement ----------------------------------------------------------
class Call(NamedTuple):
    """What an op tells ``auto`` about one call of a contract function."""

    shape: tuple  # batch first (it is bucketed); ints, or labelled strings for settings
    dtype: torch.dtype
    mask: Tensor | None = None  # its density bucket is part of the key
    weight: Tensor | None = None  # whether it is frozen (an attack's scope) is too
    # Maker of timing arguments where the call writes into an input (pgd_step_'s out), so
    # the timed runs leave no trace; made only when a measurement runs.
    scratch: Callable[[], tuple] | None = None


Describe = Callable[[str, tuple], Call]


def _candidates(op: str, device: torch.device) -> dict[str, Any]:
    """Non-reference implementations ``auto`` may time for ``op`` on ``device``."""
    memo_key = (op, device.type)
    out = _candidates_memo.get(memo_key)
    if out is not None:
        return out
    out = {}
    names = ("cpp",) if device.type == "cpu" else ("cuda", "triton")
    for name in names:
        why = _reason(name, device)
        if why is None:
            try:
                out.update(_cpp.variants(op) if name == "cpp" else {name: _module(name).loader(op)})
                continue
            except Exception as e:  # build or import failure: one log line, then torch
                why = f"{type(e).__name__}: {e}"
        _log_skip(name, op, why)
    _candidates_memo[memo_key] = out
    return out


def _density(mask: Tensor) -> float:
    from ._cpp_ops import density  # cached per mask version; lazy: _cpp_ops imports ops

    return density(mask)


def _scope(w: Tensor | None) -> str:
    """``frozen`` inside an attack's :func:`~sparse_adv_fast.ops._cache.frozen` scope, where
    derived forms (masked weight, CSR) are built once and reused, so only kernel time counts;
    ``eager`` elsewhere, where a forward rebuilds them and their cost is part of the choice;
    ``-`` for calls that read no weight."""
    if w is None:
        return "-"
    return "frozen" if _ops_cache().is_frozen(w) else "eager"


@functools.cache
def _ops_cache() -> Any:
    """``sparse_adv_fast.ops._cache``, resolved once (not at import: the ops import this
    module) rather than by an import statement on every op call."""
    from ..ops import _cache

    return _cache


def _records() -> dict[str, Any]:
    """The cache file's records, read once per path."""
    path = _autotune.cache_path()
    if _disk["path"] != path:
        _disk["path"], _disk["records"] = path, _autotune.read(path)
    return _disk["records"]


class _Auto:
    """``auto``'s namespace for one op on one device: each contract function (``forward``,
    ``grad_input``, ...) looks up, or measures, the implementation for its call signature."""

    # Calls seen, by a tuple that is cheap to build: exact shape, the mask by identity and
    # version (its density is not recomputed), dtype, threads and scope. A stale hit after a
    # mask's id is reused can only cost speed: every candidate computes the same result.
    FAST_LIMIT = 4096

    def __init__(self, op: str, device: torch.device, reference: Any, describe: Describe) -> None:
        self.op, self.device, self.reference, self.describe = op, device, reference, describe
        self._fast: dict[tuple, Callable[..., Any]] = {}

    def __getattr__(self, direction: str) -> Callable[..., Any]:
        if direction.startswith("_") or not hasattr(self.reference, direction):
            raise AttributeError(direction)

        def call(*args: Any) -> Any:
            return self.pick(direction, args)(*args)

        call.__name__ = direction
        self.__dict__[direction] = call  # later lookups skip __getattr__
        return call

    def _fn(self, name: str, direction: str) -> Callable[..., Any] | None:
        if name == _autotune.REFERENCE:
            return getattr(self.reference, direction)
        impl = _candidates(self.op, self.device).get(name)
        return None if impl is None else getattr(impl, direction, None)

    def _admissible(self, name: str, key: _autotune.Key, mask: Tensor | None) -> bool:
        """Whether ``name`` may serve ``key``: a sparse kernel only within its density range
        (``max_density``: a number, or a function of the mask's shape), also when a cache
        file written by older code says otherwise."""
        impl = _candidates(self.op, self.device).get(name)
        limit = getattr(impl, "max_density", None)
        if callable(limit):
            limit = limit(tuple(mask.shape)) if mask is not None else None
        return limit is None or key.density is None or key.density <= limit

    def _static(self, direction: str) -> Callable[..., Any]:
        _, impl = resolve(self.op, self.device)  # auto mode: the static rule
        return getattr(impl if impl is not None else self.reference, direction)

    @staticmethod
    def _fast_key(direction: str, call: Call) -> tuple:
        mask = call.mask
        return (direction, call.shape, call.dtype, torch.get_num_threads(), _scope(call.weight),
                None if mask is None else (id(mask), mask._version))

    def remembered(self, direction: str, args: tuple) -> Callable[..., Any] | None:
        """The implementation already picked for a call like ``args``, or None when no
        such call has been made yet (nothing is measured here)."""
        return self._fast.get(self._fast_key(direction, self.describe(direction, args)))

    def pick(self, direction: str, args: tuple) -> Callable[..., Any]:
        """The implementation of ``direction`` for a call with ``args``."""
        if not _autotune.enabled():
            return self._static(direction)
        call = self.describe(direction, args)
        fast = self._fast_key(direction, call)
        fn = self._fast.get(fast)
        if fn is not None:
            return fn
        mask, scope = call.mask, _scope(call.weight)
        if call.shape and call.shape[0] == 0:  # nothing to time, and every kernel's edge case
            return getattr(self.reference, direction)
        density = None if mask is None or mask.numel() == 0 else _density(mask)
        key = _autotune.make_key(self.op, direction, call.shape, density, call.dtype,
                                 self.device, scope)
        name = _chosen.get(key)
        if name is None:
            name = self._decide(key, direction, args, call.scratch, mask)
            if name is None:
                return self._static(direction)  # not remembered: measured when it can be
        fn = self._fn(name, direction) or getattr(self.reference, direction)
        if len(self._fast) >= self.FAST_LIMIT:
            self._fast.clear()
        self._fast[fast] = fn
        return fn

    def _decide(self, key: _autotune.Key, direction: str, args: tuple,
                scratch: Callable[[], tuple] | None, mask: Tensor | None) -> str | None:
        text = key.text()
        rec = _records().get(text)
        if rec is not None and self._admissible(rec["choice"], key, mask) \
                and self._fn(rec["choice"], direction) is not None:
            _chosen[key] = rec["choice"]
            return rec["choice"]
        if not _autotune.can_measure(args):
            return None  # the static rule, until an eager call measures
        if scratch is not None:
            args = scratch()
        fns = {_autotune.REFERENCE: getattr(self.reference, direction)}
        for name, impl in _candidates(self.op, self.device).items():
            fn = getattr(impl, direction, None)
            if fn is not None and self._admissible(name, key, mask):
                fns[name] = fn
        if len(fns) == 1:  # nothing to compare: no timing, and nothing worth writing down
            _chosen[key] = _autotune.REFERENCE
            return _autotune.REFERENCE
        choice = _autotune.measure(key, {n: _bind(f, args) for n, f in fns.items()})
        _chosen[key] = choice.name
        rec = _autotune.record(key, choice)
        _records()[text] = rec
        _autotune.write({text: rec}, _disk["path"])
        _log.info("sparse_adv_fast: %s %s", text, _autotune.explain(rec))
        return choice.name


def _bind(fn: Callable[..., Any], args: tuple) -> Callable[[], Any]:
    return lambda: fn(*args)


def impl(op: str, device: torch.device, reference: Any, describe: Describe) -> Any:
    """The namespace of ``op``'s contract functions to run on ``device``.

    A forced backend's namespace (or ``reference`` for ``torch``); in ``auto`` mode one
    whose functions pick by measurement per call, ``describe`` telling them the call's
    shape, mask, dtype and side-effect-free timing arguments.
    """
    if current() != "auto":
        _, ns = resolve(op, device)
        return ns if ns is not None else reference
    key = (op, device.type, -1 if device.index is None else device.index)
    hit = _autos.get(key)
    if hit is None or hit.reference is not reference:
        hit = _autos[key] = _Auto(op, device, reference, describe)
    return hit


def remembered(ns: Any, calls: list[tuple[str, tuple]]) -> list[Callable[..., Any]] | None:
    """The functions the op namespace ``ns`` (from :func:`impl`) runs for every
    ``(direction, args)`` in ``calls``, or None while ``auto`` has not yet picked for such a
    call (nothing is measured here). A forced backend's functions are its own."""
    if not isinstance(ns, _Auto):
        return [getattr(ns, d) for d, _ in calls]
    fns = [ns.remembered(d, args) for d, args in calls]
    return None if any(f is None for f in fns) else fns


def choices() -> dict[str, dict]:
    """Every measured choice known here (the cache file and this process), by key text."""
    out = dict(_autotune.read())
    out.update(_records())
    return out


__all__ = [
    "NAMES", "BackendUnavailable", "Call", "available", "choices", "clear_cache", "current", "impl",
    "reset", "resolve", "use", "using",
]
