"""The ``cpp`` backend: CPU C++ extensions (OpenMP), built lazily per op.

Two faces:

* :func:`loader` — what a *forced* ``cpp`` backend (and ``auto`` with measuring switched
  off) runs: :mod:`._cpp_ops`, the static rule of dense BLAS above fixed density thresholds
  and the sparse kernels below them; other ops get their raw extension module.
* :func:`variants` — the separate candidates ``auto`` times for the masked ops. Only
  ``cpp-sparse`` is listed: the cpp *dense* path is torch's own BLAS / oneDNN call on the
  cached masked weight, i.e. the torch reference, so timing it twice would measure the same
  code. ``cpp-sparse`` always runs the CSR kernels, whatever the density, and raises for
  what those kernels do not take (half precision), so the timer skips it there.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from torch import Tensor

from . import _build

_loaded: dict[str, Any] = {}
_variants: dict[str, dict[str, Any]] = {}
Conv = tuple[list[int], list[int], list[int], int]


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


def _check_sparse(t: Tensor, mask: Tensor) -> None:
    from ._cpp_ops import _SPARSE_DTYPES

    if t.dtype not in _SPARSE_DTYPES:
        raise TypeError(f"the cpp sparse kernels take float32/float64, got {t.dtype}")
    if mask.numel() == 0:
        raise ValueError("the cpp sparse kernels need a non-empty weight")


# Above this density ``auto`` does not time the CSR kernels: they would do more than half
# the dense MACs through index gathers, which never beats oneDNN/BLAS, and on a noisy machine
# a mistimed dense reference could otherwise hand a dense layer to them.
MAX_DENSITY = 0.5


class SparseLinear:
    """``masked_linear`` on the CSR kernels at any density (contract of ops/masked_linear)."""

    max_density = MAX_DENSITY

    def __init__(self, ext: ModuleType) -> None:
        self._ext = ext

    def forward(self, x2d: Tensor, w: Tensor, mask: Tensor, b: Tensor | None) -> Tensor:
        """``x2d (w ⊙ mask)^T + b`` by SpMM over the cached CSR."""
        from ._cpp_ops import csr, index_dtype

        _check_sparse(x2d, mask)
        rowptr, col, val = csr(w, mask, index_dtype(w.shape[1]))
        return self._ext.spmm(x2d, rowptr, col, val, w.shape[0], b)

    def grad_input(self, gy2d: Tensor, w: Tensor, mask: Tensor) -> Tensor:
        """``gy2d (w ⊙ mask)`` scattered through the forward CSR."""
        from ._cpp_ops import csr, index_dtype

        _check_sparse(gy2d, mask)
        rowptr, col, val = csr(w, mask, index_dtype(w.shape[1]))
        return self._ext.spmm_t(gy2d, rowptr, col, val, w.shape[1])

    def grad_weight(self, gy2d: Tensor, x2d: Tensor, mask: Tensor) -> Tensor:
        """``(gy2d^T x2d) ⊙ mask`` computed at the kept entries only (SDDMM)."""
        from ._cpp_ops import index_dtype, pattern

        _check_sparse(x2d, mask)
        rowptr, col = pattern(mask, index_dtype(mask.shape[1]))
        return self._ext.sddmm(gy2d, x2d, rowptr, col)


class SparseConv2d:
    """``masked_conv2d`` on the direct sparse kernels at any density."""

    max_density = MAX_DENSITY

    def __init__(self, ext: ModuleType) -> None:
        self._ext = ext

    def forward(self, x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None, conv: Conv) -> Tensor:
        """``conv2d(x, w ⊙ mask, b, *conv)`` over the cached CSR of the weight."""
        from ._cpp_ops import csr, index_dtype

        _check_sparse(x, mask)
        rowptr, col, val = csr(w, mask, index_dtype(mask[0].numel()))
        return self._ext.conv_forward(x, rowptr, col, val, list(w.shape), b, *conv)

    def grad_input(self, gy: Tensor, x: Tensor, w: Tensor, mask: Tensor, conv: Conv) -> Tensor:
        """Input gradient over the transposed CSR."""
        from ._cpp_ops import csr_t, index_dtype

        _check_sparse(gy, mask)
        stride, padding, dilation, groups = conv
        oc, cg, kh, kw = w.shape
        index = index_dtype((oc // groups) * kh * kw)  # transposed row length
        # Stride 1: the input gradient is a plain convolution of gy with the flipped,
        # transposed weight and padding d*(k-1)-p, which runs the register-blocked kernel.
        pad_t = [dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1]]
        if list(stride) == [1, 1] and min(pad_t) >= 0:
            rowptr, col, val = csr_t(w, mask, groups, flip=True, index=index)
            return self._ext.conv_forward(gy, rowptr, col, val,
                                          [cg * groups, oc // groups, kh, kw], None,
                                          [1, 1], pad_t, list(dilation), groups)
        rowptr, col, val = csr_t(w, mask, groups, index=index)
        return self._ext.conv_grad_input(gy, list(x.shape), rowptr, col, val, list(w.shape),
                                         *conv)

    def grad_weight(self, gy: Tensor, x: Tensor, mask: Tensor, conv: Conv) -> Tensor:
        """Weight gradient at the kept entries, exact zeros elsewhere."""
        from ._cpp_ops import index_dtype, pattern

        _check_sparse(x, mask)
        rowptr, col = pattern(mask, index_dtype(mask[0].numel()))
        return self._ext.conv_grad_weight(gy, x, rowptr, col, list(mask.shape), *conv)


_SPARSE = {"masked_linear": SparseLinear, "masked_conv2d": SparseConv2d}


def variants(op: str) -> dict[str, Any]:
    """The cpp candidates ``auto`` times for ``op``: ``{"cpp-sparse": ...}`` for the masked
    ops, ``{"cpp": extension}`` for the others. Raises like :func:`loader` when the
    extension cannot be built."""
    out = _variants.get(op)
    if out is None:
        cls = _SPARSE.get(op)
        ext = _build.load(op, "cpp")
        if cls is not None:  # native mask kernels, also when the forced-cpp loader never ran
            from ._cpp_ops import register_native

            register_native(ext)
        out = _variants[op] = {"cpp": ext} if cls is None else {"cpp-sparse": cls(ext)}
    return out
