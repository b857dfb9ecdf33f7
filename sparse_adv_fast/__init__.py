"""sparse-adv-fast: sparse, adversarially robust networks, trained and evaluated fast.

Implements "Achieving Adversarial Robustness via Sparsity" (arXiv 2009.05423): masked
layers with fused kernels, fused PGD steps, adversarial pruning (magnitude, lottery-ticket
IMP, HYDRA-style scores), Inverse Weights Inheritance and robustness metrics.

Importing this package compiles nothing, touches no CUDA device and does not import
triton; native extensions are built on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import backends, functional, nn, ops
from .nn import apply_masks, densify, layer_sparsity, masks, sparsify, sparsity

__version__ = "0.1.0"

# User-level parts are imported on first attribute access to keep `import` light.
_LAZY = ("attacks", "prune", "train", "iwi", "metrics", "data", "models", "checkpoint", "cli")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "apply_masks",
    "backends",
    "densify",
    "functional",
    "layer_sparsity",
    "masks",
    "nn",
    "ops",
    "sparsify",
    "sparsity",
    *_LAZY,
]
