"""Python layer of the ``cpp`` backend for the masked ops: dense vs sparse choice.

Dense-ish masks run torch's BLAS / oneDNN kernels on the cached masked weight (so a masked
layer costs what a dense one does). At or below a measured density (:data:`LINEAR_SPARSE_DENSITY`,
:data:`CONV_SPARSE_DENSITY`, :data:`CONV_GRAD_WEIGHT_SPARSE_DENSITY`) the op switches to
the extension's sparse kernels over a CSR of the mask's structure, built once per
weight/mask version through :func:`sparse_adv_fast.ops._cache.get` and dropped when the
weight changes. ``grad_weight`` on the sparse path computes only the kept entries (SDDMM).
Column indices are int16 when the row length allows. The linear layer holds one CSR: its
input gradient scatters through the forward CSR instead of keeping a transposed one; the
stride-1 conv input gradient has the extension derive its transposed CSR per call, and only
other strides cache a transposed copy.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import _cache

# Densities (kept fractions) at or below which the sparse kernels run. Measured with an
# interleaved min-of-5 timing of fwd+grad_x ("attack") and fwd+grad_x+grad_w ("train") on the
# shared 2-core dev CPU (AMD EPYC, AVX2, torch 2.13 CPU, oneDNN/BLAS dense baselines):
#   linear 2048x2048 batch 256, sparse speed-up over dense at density 0.1/0.15/0.2/0.3:
#     attack 2.6/2.4/1.9/1.2x, train 2.3/1.8/1.4/1.05x
#   conv 64->64 3x3 32x32 batch 32 (padding 1):
#     attack 2.1/1.6/1.2/0.95x, train 1.4/1.0/0.76/0.5x (the SDDMM weight grad is the limit)
# Each threshold sits one step below the measured crossover, leaving margin for noise.
LINEAR_SPARSE_DENSITY = 0.2
CONV_SPARSE_DENSITY = 0.15  # conv forward and grad_input
CONV_GRAD_WEIGHT_SPARSE_DENSITY = 0.1

_SPARSE_DTYPES = (torch.float32, torch.float64)
# Rows up to this long index their columns in int16 (the largest index is 32767).
_INT16_COLS = 1 << 15

Conv = tuple[list[int], list[int], list[int], int]


def density(mask: Tensor) -> float:
    """Kept fraction of ``mask``, cached per mask version."""
    return _cache.get(mask, mask, "density", lambda: float(mask.sum()) / max(mask.numel(), 1))


def _use_sparse(t: Tensor, mask: Tensor, limit: float) -> bool:
    return t.dtype in _SPARSE_DTYPES and mask.numel() > 0 and density(mask) <= limit


def _pattern(mask2d: Tensor, index: torch.dtype = torch.int32) -> tuple[Tensor, Tensor]:
    """CSR structure (rowptr int64, col ``index``) of a 2-D bool tensor, row-major order."""
    counts = mask2d.sum(1)
    rowptr = torch.zeros(mask2d.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=rowptr[1:])
    col = mask2d.nonzero()[:, 1].to(index)
    return rowptr, col


def index_dtype(ncols: int) -> torch.dtype:
    """Narrowest column-index dtype the sparse kernels take for rows of ``ncols`` entries."""
    return torch.int16 if ncols <= _INT16_COLS else torch.int32


def _rows(mask: Tensor) -> Tensor:
    """The mask as rows = output channels/features (a view)."""
    return mask.reshape(mask.shape[0], -1)


def _rows_t(t: Tensor, groups: int) -> Tensor:
    """``t`` (OC, Cg, *k) as rows = global input channel, columns = (ocl, ky, kx)."""
    oc, cg = t.shape[0], t.shape[1]
    kk = t[0, 0].numel() if t.dim() > 2 else 1
    t4 = t.reshape(groups, oc // groups, cg, kk).permute(0, 2, 1, 3)
    return t4.reshape(groups * cg, (oc // groups) * kk)


_native: ModuleType | None = None


def register_native(ext: ModuleType) -> None:
    """Use ``ext``'s form kernels (``zero_pruned_``, ``csr_values``: both masked-op
    extensions carry them) for the masked weight's CPU forms. Called when a cpp masked-op
    extension loads; an older ahead-of-time build without them keeps the torch fallbacks."""
    global _native
    if hasattr(ext, "csr_values") and hasattr(ext, "zero_pruned_"):
        _native = ext
        _cache.register_zero_kernel("cpu", ext.zero_pruned_)


def _values(w2d: Tensor, rowptr: Tensor, col: Tensor) -> Tensor:
    """``w2d`` at the CSR's stored positions, in its order: one gather (a boolean index
    would scan the whole mask again)."""
    if _native is not None:
        return _native.csr_values(w2d, rowptr, col)
    rows = torch.repeat_interleave(torch.arange(w2d.shape[0]), rowptr.diff())
    return w2d[rows, col.long()].contiguous()


def csr(w: Tensor, mask: Tensor, index: torch.dtype = torch.int32
        ) -> tuple[Tensor, Tensor, Tensor]:
    """``(rowptr, col, val)`` of ``w ⊙ mask`` with rows = outputs, cached per version.

    ``col`` has dtype ``index``; the structure is shared with :func:`pattern`.
    """

    def build() -> tuple[Tensor, Tensor, Tensor]:
        rowptr, col = pattern(mask, index)
        return rowptr, col, _values(w.detach().reshape(mask.shape[0], -1), rowptr, col)

    return _cache.get(w, mask, f"csr{_INDEX_TAG[index]}", build)


def csr_t(w: Tensor, mask: Tensor, groups: int = 1,
          index: torch.dtype = torch.int32) -> tuple[Tensor, Tensor, Tensor]:
    """CSR of the transposed masked weight (rows = inputs, ``index`` columns), cached per
    version. Only the conv input gradient uses it (the linear one scatters through
    :func:`csr`) with a stride other than 1.
    """

    def build() -> tuple[Tensor, Tensor, Tensor]:
        rowptr, col = pattern_t(mask, groups, index)
        return rowptr, col, _values(_rows_t(w.detach(), groups), rowptr, col)

    return _cache.get(w, mask, f"csr_t{groups}{_INDEX_TAG[index]}", build)


def pattern(mask: Tensor, index: torch.dtype = torch.int32) -> tuple[Tensor, Tensor]:
    """CSR structure of ``mask`` (rows = outputs, ``index`` columns), cached per mask version."""
    return _cache.get(mask, mask, f"pattern{_INDEX_TAG[index]}",
                      lambda: _pattern(_rows(mask), index))


def pattern_t(mask: Tensor, groups: int = 1,
              index: torch.dtype = torch.int32) -> tuple[Tensor, Tensor]:
    """CSR structure of the transposed mask as :func:`csr_t` lays it out, cached per mask
    version (so a training step gathers the transposed values only)."""

    def build() -> tuple[Tensor, Tensor]:
        return _pattern(_rows_t(mask, groups), index)

    return _cache.get(mask, mask, f"pattern_t{groups}{_INDEX_TAG[index]}", build)


_INDEX_TAG = {torch.int32: "", torch.int16: "16"}


# The two paths of each masked op, as functions: the static rule below (``LinearOps``,
# ``Conv2dOps``) picks one by density; ``auto``'s ``cpp-sparse`` candidate
# (:mod:`.cpp`) runs the sparse ones at any density. ``ext`` is the op's extension.
def sparse_linear_forward(ext: ModuleType, x2d: Tensor, w: Tensor, mask: Tensor,
                          b: Tensor | None) -> Tensor:
    """``x2d (w ⊙ mask)^T + b`` by SpMM over the cached CSR."""
    rowptr, col, val = csr(w, mask, index_dtype(w.shape[1]))
    return ext.spmm(x2d, rowptr, col, val, w.shape[0], b)


def dense_linear_forward(x2d: Tensor, w: Tensor, mask: Tensor, b: Tensor | None) -> Tensor:
    """``x2d (w ⊙ mask)^T + b`` by BLAS on the cached masked weight."""
    return F.linear(x2d, _cache.masked_weight(w, mask), b)


def sparse_linear_grad_input(ext: ModuleType, gy2d: Tensor, w: Tensor, mask: Tensor) -> Tensor:
    """``gy2d (w ⊙ mask)``, scattered through the forward's CSR (no transposed copy)."""
    rowptr, col, val = csr(w, mask, index_dtype(w.shape[1]))
    return ext.spmm_t(gy2d, rowptr, col, val, w.shape[1])


def dense_linear_grad_input(gy2d: Tensor, w: Tensor, mask: Tensor) -> Tensor:
    """``gy2d (w ⊙ mask)`` by BLAS on the cached masked weight."""
    return gy2d @ _cache.masked_weight(w, mask)


def sparse_linear_grad_weight(ext: ModuleType, gy2d: Tensor, x2d: Tensor, mask: Tensor) -> Tensor:
    """``(gy2d^T x2d) ⊙ mask`` computed at the kept entries only (SDDMM)."""
    rowptr, col = pattern(mask, index_dtype(mask.shape[1]))
    return ext.sddmm(gy2d, x2d, rowptr, col)


def dense_linear_grad_weight(gy2d: Tensor, x2d: Tensor, mask: Tensor) -> Tensor:
    """``(gy2d^T x2d) ⊙ mask`` by one dense GEMM, exact zeros at pruned positions."""
    return _masked_grad(torch.mm(gy2d.t(), x2d), mask)


def sparse_conv_forward(ext: ModuleType, x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None,
                        conv: Conv, relu: bool = False) -> Tensor:
    """``conv2d(x, w ⊙ mask, b, *conv)`` by the direct sparse kernel over the cached CSR;
    ``relu`` applies a ReLU as the tiles are stored."""
    rowptr, col, val = csr(w, mask, index_dtype(mask[0].numel()))
    return ext.conv_forward(x, rowptr, col, val, list(w.shape), b, *conv, relu=relu)


def dense_conv_forward(x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None,
                       conv: Conv) -> Tensor:
    """``conv2d(x, w ⊙ mask, b, *conv)`` by oneDNN on the cached masked weight."""
    stride, padding, dilation, groups = conv
    return F.conv2d(x, _cache.masked_weight(w, mask), b, stride, padding, dilation, groups)


def sparse_conv_grad_input(ext: ModuleType, gy: Tensor, x: Tensor, w: Tensor, mask: Tensor,
                           conv: Conv, gate: Tensor | None = None) -> Tensor:
    """Input gradient by the direct sparse kernel (``x`` gives the shape).

    Padding within the dilated kernel's reach (every body, downsampling and shortcut conv):
    one stride-1 convolution of gy, per phase plane of the input (stride² of them), over a
    transposed CSR the extension derives per call from the forward one, so no transposed
    copy is cached. Wider padding scatters through a cached transposed CSR.
    ``gate`` (the output of a ReLU applied to this convolution) first passes ``gy`` back
    through that ReLU; the direct kernel does it while it pads ``gy``.
    """
    stride, padding, dilation, groups = conv
    oc, cg, kh, kw = w.shape
    if dilation[0] * (kh - 1) >= padding[0] and dilation[1] * (kw - 1) >= padding[1]:
        rowptr, col, val = csr(w, mask, index_dtype(mask[0].numel()))
        return ext.conv_grad_input_direct(gy, list(x.shape), rowptr, col, val, list(w.shape),
                                          list(stride), list(padding), list(dilation), groups,
                                          gate)
    if gate is not None:
        gy = torch.ops.aten.threshold_backward(gy, gate, 0)
    index = index_dtype((oc // groups) * kh * kw)  # transposed row length
    rowptr, col, val = csr_t(w, mask, groups, index=index)
    return ext.conv_grad_input(gy, list(x.shape), rowptr, col, val, list(w.shape), *conv)


def dense_conv_grad_input(gy: Tensor, x: Tensor, w: Tensor, mask: Tensor, conv: Conv) -> Tensor:
    """Input gradient by aten's convolution backward on the cached masked weight."""
    return _conv_backward(gy, x, _cache.masked_weight(w, mask), conv, (True, False))[0]


def sparse_conv_grad_weight(ext: ModuleType, gy: Tensor, x: Tensor, mask: Tensor,
                            conv: Conv) -> Tensor:
    """Weight gradient at the kept entries only, exact zeros elsewhere."""
    rowptr, col = pattern(mask, index_dtype(mask[0].numel()))
    return ext.conv_grad_weight(gy, x, rowptr, col, list(mask.shape), *conv)


def dense_conv_grad_weight(gy: Tensor, x: Tensor, mask: Tensor, conv: Conv) -> Tensor:
    """Dense weight gradient by aten's convolution backward, exact zeros at pruned positions."""
    w_like = x.new_empty(mask.shape)  # only its shape is read
    return _masked_grad(_conv_backward(gy, x, w_like, conv, (False, True))[1], mask)


class LinearOps:
    """``masked_linear`` backend functions (contract of ``ops/masked_linear.py``): sparse at
    or below :data:`LINEAR_SPARSE_DENSITY`, dense above."""

    def __init__(self, ext: ModuleType) -> None:
        self._ext = ext

    def forward(self, x2d: Tensor, w: Tensor, mask: Tensor, b: Tensor | None) -> Tensor:
        """``x2d (w ⊙ mask)^T + b``."""
        if _use_sparse(x2d, mask, LINEAR_SPARSE_DENSITY):
            return sparse_linear_forward(self._ext, x2d, w, mask, b)
        return dense_linear_forward(x2d, w, mask, b)

    def grad_input(self, gy2d: Tensor, w: Tensor, mask: Tensor) -> Tensor:
        """``gy2d (w ⊙ mask)``."""
        if _use_sparse(gy2d, mask, LINEAR_SPARSE_DENSITY):
            return sparse_linear_grad_input(self._ext, gy2d, w, mask)
        return dense_linear_grad_input(gy2d, w, mask)

    def grad_weight(self, gy2d: Tensor, x2d: Tensor, mask: Tensor) -> Tensor:
        """``(gy2d^T x2d) ⊙ mask`` with exact zeros at pruned positions."""
        if _use_sparse(x2d, mask, LINEAR_SPARSE_DENSITY):
            return sparse_linear_grad_weight(self._ext, gy2d, x2d, mask)
        return dense_linear_grad_weight(gy2d, x2d, mask)


class Conv2dOps:
    """``masked_conv2d`` backend functions (contract of ``ops/masked_conv2d.py``): sparse at
    or below :data:`CONV_SPARSE_DENSITY` (:data:`CONV_GRAD_WEIGHT_SPARSE_DENSITY` for the
    weight gradient), dense above."""

    def __init__(self, ext: ModuleType) -> None:
        self._ext = ext

    def forward(self, x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None, conv: Conv) -> Tensor:
        """``conv2d(x, w ⊙ mask, b, *conv)``."""
        if _use_sparse(x, mask, CONV_SPARSE_DENSITY):
            return sparse_conv_forward(self._ext, x, w, mask, b, conv)
        return dense_conv_forward(x, w, mask, b, conv)

    def grad_input(self, gy: Tensor, x: Tensor, w: Tensor, mask: Tensor, conv: Conv) -> Tensor:
        """Gradient of the convolution w.r.t. its input (``x`` gives the shape)."""
        if _use_sparse(gy, mask, CONV_SPARSE_DENSITY):
            return sparse_conv_grad_input(self._ext, gy, x, w, mask, conv)
        return dense_conv_grad_input(gy, x, w, mask, conv)

    def forward_relu(self, x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None,
                     conv: Conv) -> Tensor:
        """``relu(conv2d(x, w ⊙ mask, b, *conv))``, fused on the sparse path."""
        if _use_sparse(x, mask, CONV_SPARSE_DENSITY):
            return sparse_conv_forward(self._ext, x, w, mask, b, conv, relu=True)
        return torch.relu(dense_conv_forward(x, w, mask, b, conv))

    def grad_input_relu(self, gy: Tensor, y: Tensor, x: Tensor, w: Tensor, mask: Tensor,
                        conv: Conv) -> Tensor:
        """Input gradient of :meth:`forward_relu` (``y`` its output), fused when sparse."""
        if _use_sparse(gy, mask, CONV_SPARSE_DENSITY):
            return sparse_conv_grad_input(self._ext, gy, x, w, mask, conv, gate=y)
        gy = torch.ops.aten.threshold_backward(gy, y, 0)
        return dense_conv_grad_input(gy, x, w, mask, conv)

    def grad_weight(self, gy: Tensor, x: Tensor, mask: Tensor, conv: Conv) -> Tensor:
        """Weight gradient, exact zeros at pruned positions."""
        if _use_sparse(x, mask, CONV_GRAD_WEIGHT_SPARSE_DENSITY):
            return sparse_conv_grad_weight(self._ext, gy, x, mask, conv)
        return dense_conv_grad_weight(gy, x, mask, conv)


def _masked_grad(gw: Tensor, mask: Tensor) -> Tensor:
    """The dense weight gradient with exact zeros at pruned positions, in place."""
    _cache.zero_pruned_(gw, mask)
    return gw


def _conv_backward(gy: Tensor, x: Tensor, w: Tensor, conv: Conv, need: tuple[bool, bool]):
    stride, padding, dilation, groups = conv
    return torch.ops.aten.convolution_backward(
        gy, x, w, None, stride, padding, dilation, False, [0, 0], groups, [*need, False]
    )


_WRAPPERS: dict[str, Any] = {"masked_linear": LinearOps, "masked_conv2d": Conv2dOps}


def wrap(op: str, ext: ModuleType) -> Any:
    """The contract namespace for ``op`` over its extension; the raw extension for ops this
    layer does not wrap (e.g. ``pgd_step``)."""
    cls = _WRAPPERS.get(op)
    if cls is None:
        return ext
    register_native(ext)
    return cls(ext)


__all__ = ["CONV_GRAD_WEIGHT_SPARSE_DENSITY", "CONV_SPARSE_DENSITY", "LINEAR_SPARSE_DENSITY",
           "Conv2dOps", "LinearOps", "csr", "csr_t", "density", "dense_conv_forward",
           "dense_conv_grad_input", "dense_conv_grad_weight", "dense_linear_forward",
           "dense_linear_grad_input", "dense_linear_grad_weight", "sparse_conv_forward",
           "sparse_conv_grad_input", "sparse_conv_grad_weight", "sparse_linear_forward",
           "sparse_linear_grad_input", "sparse_linear_grad_weight", "index_dtype", "pattern",
           "pattern_t", "register_native", "wrap"]
