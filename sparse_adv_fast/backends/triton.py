"""The ``triton`` backend: kernels in ``sparse_adv_fast.kernels`` (imported lazily)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(need_gpu: bool = True) -> str | None:
    """Why triton cannot run here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if need_gpu and not interpreting():
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run kernels on the CPU)"
    return None


def loader(op: str) -> ModuleType:
    """The kernel module for ``op`` (functions named as in ``ops/<op>.py``)."""
    return importlib.import_module(f"sparse_adv_fast.kernels.{op}")
