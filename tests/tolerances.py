"""The one tolerance table every backend-vs-reference test uses.

fp32 entries allow for a different summation order (blocked GEMM, im2col, sparse
kernels) over reductions of up to a few thousand terms; half types for GPU runs only.
"""

from __future__ import annotations

import torch

TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 msg: str = "") -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype``."""
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{msg}\n{m}" if msg else m)
