"""Backend registry: which implementation runs an op for a given tensor.

Order for CUDA tensors is ``cuda > triton > torch``; for CPU tensors ``cpp > torch``
(``triton`` also runs CPU tensors when ``TRITON_INTERPRET=1``, but only when forced).
``SPARSE_ADV_FAST_BACKEND`` or :func:`use` forces one backend: a forced backend that
cannot run raises :class:`BackendUnavailable` with the reason. In ``auto`` mode a backend
that fails to load is skipped with a single log line.

Nothing here imports triton, compiles, or touches CUDA at import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from . import cpp as _cpp
from . import cuda as _cuda
from . import triton as _triton

NAMES = ("torch", "cpp", "triton", "cuda")
_ENV = "SPARSE_ADV_FAST_BACKEND"
_log = logging.getLogger("sparse_adv_fast")
_forced: str | None = None
_warned: set[tuple[str, str]] = set()
_resolved: dict[tuple[str, str, str, bool], tuple[str, Any]] = {}


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
    if _forced is not None:
        return _forced
    env = os.environ.get(_ENV, "").strip()
    return _check_name(env) if env else "auto"


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
    """Pick the backend for ``op`` on ``device``.

    Returns ``(name, impl)`` where ``impl`` is a namespace with the op's backend functions
    (names fixed by ``sparse_adv_fast/ops/<op>.py``), or ``("torch", None)``. The choice
    is remembered per (op, device type, forced backend): ops call this on every launch.
    """
    forced = current()
    key = (op, device.type, forced, _triton.interpreting())
    hit = _resolved.get(key)
    if hit is None:
        hit = _resolved[key] = _resolve(op, device, forced)
    return hit


def reset() -> None:
    """Forget remembered choices and logged fallbacks (after installing a compiler, say)."""
    _resolved.clear()
    _warned.clear()


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
    order = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    for name in order:
        why = _reason(name, device)
        if why is None:
            try:
                return name, _module(name).loader(op)
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
        if name != "cuda" or device.type == "cuda":
            key = (name, op)
            if key not in _warned:
                _warned.add(key)
                _log.info("sparse_adv_fast: %s backend skipped for %s (%s)", name, op, why)
    return "torch", None


__all__ = [
    "NAMES", "BackendUnavailable", "available", "current", "reset", "resolve", "use", "using",
]
