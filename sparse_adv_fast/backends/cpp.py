"""The ``cpp`` backend: CPU C++ extensions (OpenMP), built lazily per op."""

from __future__ import annotations

from types import ModuleType

from . import _build


def unavailable_reason() -> str | None:
    """Why the cpp backend cannot run here, or None."""
    return _build.compiler_reason()


def loader(op: str) -> ModuleType:
    """The built extension for ``op`` (functions named as in ``ops/<op>.py``)."""
    return _build.load(op, "cpp")
