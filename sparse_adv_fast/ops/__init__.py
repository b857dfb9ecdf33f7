"""Custom ops (``torch.library``, namespace ``saf``) with their pure-torch references.

``saf.ops.masked_linear`` etc. are the op functions; since they shadow the modules of
the same name, :func:`op_module` returns a module (its reference functions, contract).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .masked_conv2d import masked_conv2d, masked_conv2d_relu
from .masked_linear import masked_linear
from .pgd_step import pgd_step, pgd_step_, random_start


def op_module(name: str) -> ModuleType:
    """The module ``sparse_adv_fast.ops.<name>`` (reference implementation and contract)."""
    return importlib.import_module(f"{__name__}.{name}")


__all__ = [
    "masked_conv2d", "masked_conv2d_relu", "masked_linear",
    "op_module", "pgd_step", "pgd_step_", "random_start",
]
