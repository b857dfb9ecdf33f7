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
# Except for a thin convolution, of at most THIN_CHANNELS input channels a group (an RGB or
# grey stem, a depthwise conv): its reduction over channels is too short for oneDNN's
# register tiles, and there the direct kernels win at any density (a 3->16 3x3 stem at
# 32x32, batch 32: input gradient 0.28 ms against oneDNN's 0.64-1.5 ms), so they are timed
# there too, under the wide margin.
THIN_CHANNELS = 3


class SparseLinear:
    """``masked_linear`` on the CSR kernels at any density (contract of ops/masked_linear):
    :mod:`._cpp_ops`' sparse functions, after :func:`_check_sparse`."""

    max_density = MAX_DENSITY

    def __init__(self, ext: ModuleType) -> None:
        self._ext = ext

    def forward(self, x2d: Tensor, w: Tensor, mask: Tensor, b: Tensor | None) -> Tensor:
        from ._cpp_ops import sparse_linear_forward

        _check_sparse(x2d, mask)
        return sparse_linear_forward(self._ext, x2d, w, mask, b)

    def grad_input(self, gy2d: Tensor, w: Tensor, mask: Tensor) -> Tensor:
        from ._cpp_ops import sparse_linear_grad_input

        _check_sparse(gy2d, mask)
        return sparse_linear_grad_input(self._ext, gy2d, w, mask)

    def grad_weight(self, gy2d: Tensor, x2d: Tensor, mask: Tensor) -> Tensor:
        from ._cpp_ops import sparse_linear_grad_weight

        _check_sparse(x2d, mask)
        return sparse_linear_grad_weight(self._ext, gy2d, x2d, mask)


class SparseConv2d:
    """``masked_conv2d`` on the direct sparse kernels at any density: :mod:`._cpp_ops`'
    sparse functions, after :func:`_check_sparse`."""

    def __init__(self, ext: ModuleType) -> None:
        self._ext = ext

    @staticmethod
    def max_density(mask_shape: tuple[int, ...]) -> float:
        """The densest mask of shape ``mask_shape`` (OC, C/groups, KH, KW) ``auto`` times
        these kernels on: any for a thin conv (:data:`THIN_CHANNELS`), else
        :data:`MAX_DENSITY`."""
        return 1.0 if mask_shape[1] <= THIN_CHANNELS else MAX_DENSITY

    def forward(self, x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None, conv: Conv) -> Tensor:
        from ._cpp_ops import sparse_conv_forward

        _check_sparse(x, mask)
        return sparse_conv_forward(self._ext, x, w, mask, b, conv)

    def grad_input(self, gy: Tensor, x: Tensor, w: Tensor, mask: Tensor, conv: Conv) -> Tensor:
        from ._cpp_ops import sparse_conv_grad_input

        _check_sparse(gy, mask)
        return sparse_conv_grad_input(self._ext, gy, x, w, mask, conv)

    # Fused with a following ReLU, for the attack path (ops._direct.run with relu=True).
    def forward_relu(self, x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None,
                     conv: Conv) -> Tensor:
        from ._cpp_ops import sparse_conv_forward

        _check_sparse(x, mask)
        return sparse_conv_forward(self._ext, x, w, mask, b, conv, relu=True)

    def grad_input_relu(self, gy: Tensor, y: Tensor, x: Tensor, w: Tensor, mask: Tensor,
                        conv: Conv) -> Tensor:
        from ._cpp_ops import sparse_conv_grad_input

        _check_sparse(gy, mask)
        return sparse_conv_grad_input(self._ext, gy, x, w, mask, conv, gate=y)

    def grad_weight(self, gy: Tensor, x: Tensor, mask: Tensor, conv: Conv) -> Tensor:
        from ._cpp_ops import sparse_conv_grad_weight

        _check_sparse(x, mask)
        return sparse_conv_grad_weight(self._ext, gy, x, mask, conv)


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
