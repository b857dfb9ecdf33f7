"""The ``cpp`` backend: CPU C++ extensions (OpenMP), built lazily per op.

The masked ops get a thin Python layer (:mod:`._cpp_ops`: dense BLAS path vs sparse kernels
by density); other ops get their raw extension module.
"""

from __future__ import annotations

from typing import Any

from . import _build

_loaded: dict[str, Any] = {}


def unavailable_reason() -> str | None:
    """Why the cpp backend cannot run here, or None."""
    return _build.compiler_reason()


def loader(op: str) -> Any:
    """The backend functions for ``op`` (named as in ``ops/<op>.py``).

    Raises ``RuntimeError`` with the compiler's reason when the extension cannot be built.
    """
    impl = _loaded.get(op)
    if impl is None:
        from . import _cpp_ops

        impl = _loaded[op] = _cpp_ops.wrap(op, _build.load(op, "cpp"))
    return impl
