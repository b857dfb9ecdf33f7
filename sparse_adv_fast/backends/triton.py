"""The ``triton`` backend: kernels in ``sparse_adv_fast.kernels`` (imported lazily).

triton is a dependency only where wheels exist (Linux x86_64 / aarch64, the environment
marker in ``pyproject.toml``); elsewhere :func:`unavailable_reason` says so, and the package
installs and runs on the torch and cpp backends.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
from collections.abc import Callable
from types import ModuleType
from typing import Any

MIN_VERSION = (3, 6)
# (platform.system(), platform.machine()) pairs with triton wheels on PyPI; keep in step
# with the marker on the triton dependency in pyproject.toml.
WHEEL_PLATFORMS = {("Linux", "x86_64"), ("Linux", "aarch64")}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _not_installed() -> str:
    system, machine = platform.system(), platform.machine()
    if (system, machine) not in WHEEL_PLATFORMS:
        return (f"triton is not installed: it has no wheels for {system} {machine} (only Linux "
                "x86_64/aarch64), so sparse-adv-fast does not require it here; the torch and "
                "cpp backends run instead")
    return f"triton is not installed (pip install 'triton>={MIN_VERSION[0]}.{MIN_VERSION[1]}')"


def unavailable_reason(need_gpu: bool = True) -> str | None:
    """Why triton cannot run here, or None (never imports triton)."""
    if importlib.util.find_spec("triton") is None:
        return _not_installed()
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # importable but unpackaged: trust it
        version = None
    if version is not None and _version_tuple(version) < MIN_VERSION:
        return (f"triton {version} is too old: the kernels need triton >= "
                f"{MIN_VERSION[0]}.{MIN_VERSION[1]}")
    if need_gpu and not interpreting():
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run kernels on the CPU)"
    return None


#: Ops whose kernels multiply with ``tl.dot``, and their contract functions.
_GEMM_FUNCTIONS = {
    "masked_linear": ("forward", "grad_input", "grad_weight"),
    "masked_conv2d": ("forward", "grad_input", "grad_weight"),
}


class _InterpreterHalf:
    """The kernel module for the CPU interpreter, with half-precision GEMMs on fp32 copies.

    The interpreter computes ``tl.dot`` through numpy, which has no bfloat16 (bf16 operands
    come out as garbage) and accumulates float16 products in float16. The compiled GPU
    kernels are unaffected (``tests/test_triton_compile`` lowers them). fp32 operands holding
    the half values, accumulated in fp32 and rounded once to the half type, are what the
    tensor-core path computes, so results keep their meaning.
    """

    def __init__(self, module: ModuleType, functions: tuple[str, ...]) -> None:
        self._module, self._functions = module, functions

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._module, name)
        return self._wrap(fn) if name in self._functions else fn

    @staticmethod
    def _wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            import torch

            half = next((a.dtype for a in args if isinstance(a, torch.Tensor)
                         and a.dtype in (torch.float16, torch.bfloat16)), None)
            if half is None:
                return fn(*args)
            up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == half else a
                  for a in args]
            return fn(*up).to(half)

        return call


def loader(op: str) -> ModuleType | _InterpreterHalf:
    """The kernel module for ``op`` (functions named as in ``ops/<op>.py``)."""
    module = importlib.import_module(f"sparse_adv_fast.kernels.{op}")
    if interpreting() and op in _GEMM_FUNCTIONS:
        return _InterpreterHalf(module, _GEMM_FUNCTIONS[op])
    return module
