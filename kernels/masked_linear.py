"""Triton kernels for ``masked_linear`` (contract in ``sparse_adv_fast/ops/masked_linear.py``).

One blocked GEMM ``C[P, Q] = A[P, R] @ B[R, Q]`` over arbitrary strides serves all three
functions; the mask enters in one of two places:

* ``forward`` / ``grad_input``: B is the weight, and each weight tile is multiplied by its
  mask tile as it is loaded (no masked copy of the weight is ever written);
* ``grad_weight``: the epilogue writes exact zeros where the mask is False (no separate
  masking pass over the gradient).

The mask is read bit-packed (default, 1 bit per weight) or as bytes; see ``MASK_FORMAT``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    acc_dtype,
    check_dtype,
    check_int32_indexable,
    dot_precision,
    load_mask,
    mask_operand,
    tuned,
)

#: ``"bits"`` or ``"bytes"``: how the kernels read the mask (tests exercise both).
MASK_FORMAT = "bits"

_CONFIGS = [
    triton.Config({"BLOCK_P": bp, "BLOCK_Q": bq, "BLOCK_R": br, "GROUP_P": 8}, num_warps=w,
                  num_stages=s)
    for bp, bq, br, w, s in (
        (64, 64, 32, 4, 4),   # first: the untuned default (fits float64 in shared memory)
        (128, 128, 32, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (32, 64, 64, 4, 4),   # small batch (attack on a few samples, batch 1 inference)
        (16, 64, 128, 4, 3),
        (64, 32, 64, 4, 4),
    )
]
_INTERPRET_CONFIG = triton.Config({"BLOCK_P": 16, "BLOCK_Q": 16, "BLOCK_R": 16, "GROUP_P": 2})


@tuned(_CONFIGS, key=["P", "Q", "R"], interpret_config=_INTERPRET_CONFIG)
@triton.jit
def _masked_mm(
    a_ptr, b_ptr, c_ptr, bias_ptr, m_ptr,
    P, Q, R,
    s_ap, s_ar, s_br, s_bq, s_cp, s_cq, s_m,
    B_MASK: tl.constexpr,      # mask the B tiles at load (forward / grad_input)
    K_IS_R: tl.constexpr,      # B[r, q] = W[q, r] (forward) rather than W[r, q]
    C_MASK: tl.constexpr,      # mask C in the epilogue (grad_weight); C[p, q] = G[p, q]
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_P: tl.constexpr,
):
    # grouped launch order: consecutive programs share B column tiles (L2 reuse)
    pid = tl.program_id(0)
    n_p = tl.cdiv(P, BLOCK_P)
    n_q = tl.cdiv(Q, BLOCK_Q)
    per_group = GROUP_P * n_q
    first_p = (pid // per_group) * GROUP_P
    group_size = tl.minimum(n_p - first_p, GROUP_P)
    pid_p = first_p + (pid % per_group) % group_size
    pid_q = (pid % per_group) // group_size

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_r = tl.arange(0, BLOCK_R)
    in_p = offs_p < P
    in_q = offs_q < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        in_r = rr < R
        a_ok = in_p[:, None] & in_r[None, :]
        b_ok = in_r[:, None] & in_q[None, :]
        a = tl.load(a_ptr + offs_p[:, None] * s_ap + rr[None, :] * s_ar, mask=a_ok, other=0.0)
        b = tl.load(b_ptr + rr[:, None] * s_br + offs_q[None, :] * s_bq, mask=b_ok, other=0.0)
        if B_MASK:
            if K_IS_R:
                keep = load_mask(m_ptr, offs_q[None, :], rr[:, None], s_m, b_ok, BITS)
            else:
                keep = load_mask(m_ptr, rr[:, None], offs_q[None, :], s_m, b_ok, BITS)
            b = tl.where(keep, b, 0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)

    c_ok = in_p[:, None] & in_q[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_q, mask=in_q, other=0.0).to(ACC)
        acc = acc + bias[None, :]
    if C_MASK:
        keep = load_mask(m_ptr, offs_p[:, None], offs_q[None, :], s_m, c_ok, BITS)
        acc = tl.where(keep, acc, 0.0)
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs_p[:, None] * s_cp + offs_q[None, :] * s_cq, c, mask=c_ok)


def _launch(a: Tensor, a_strides, b: Tensor, b_strides, c: Tensor, c_strides, P: int, Q: int,
            R: int, mask: Tensor, *, b_mask: bool, k_is_r: bool, c_mask: bool,
            bias: Tensor | None = None) -> Tensor:
    check_dtype(c, "masked_linear")
    check_int32_indexable("masked_linear", a, b, c)
    m, s_m, bits = mask_operand(mask, MASK_FORMAT)
    if P == 0 or Q == 0:
        return c
    if R == 0:  # empty reduction: the product is zero, plus bias
        c.zero_()
        if bias is not None:
            c += bias
        return c
    grid = lambda meta: (triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(Q, meta["BLOCK_Q"]),)
    _masked_mm[grid](
        a, b, c, bias if bias is not None else c, m,
        P, Q, R,
        *a_strides, *b_strides, *c_strides, s_m,
        B_MASK=b_mask, K_IS_R=k_is_r, C_MASK=c_mask, BITS=bits, HAS_BIAS=bias is not None,
        ACC=acc_dtype(c.dtype), PREC=dot_precision(c.dtype),
    )
    return c


def forward(x2d: Tensor, w: Tensor, mask: Tensor, b: Tensor | None) -> Tensor:
    """``y = x2d @ (w ⊙ mask)^T + b``; the mask is applied to each weight tile as it loads."""
    M, K = x2d.shape
    N = w.shape[0]
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    return _launch(
        x2d, x2d.stride(), w, (w.stride(1), w.stride(0)), y, y.stride(), M, N, K, mask,
        b_mask=True, k_is_r=True, c_mask=False, bias=b,
    )


def grad_input(gy2d: Tensor, w: Tensor, mask: Tensor) -> Tensor:
    """``gx = gy2d @ (w ⊙ mask)``, masking the weight tiles at load."""
    M, N = gy2d.shape
    K = w.shape[1]
    gx = torch.empty((M, K), dtype=gy2d.dtype, device=gy2d.device)
    return _launch(
        gy2d, gy2d.stride(), w, w.stride(), gx, gx.stride(), M, K, N, mask,
        b_mask=True, k_is_r=False, c_mask=False,
    )


def grad_weight(gy2d: Tensor, x2d: Tensor, mask: Tensor) -> Tensor:
    """``gw = (gy2d^T @ x2d) ⊙ mask``, masked in the epilogue: exact zeros where pruned."""
    M, N = gy2d.shape
    K = x2d.shape[1]
    gw = torch.empty((N, K), dtype=gy2d.dtype, device=gy2d.device)
    return _launch(
        gy2d, (gy2d.stride(1), gy2d.stride(0)), x2d, x2d.stride(), gw, gw.stride(), N, K, M, mask,
        b_mask=False, k_is_r=False, c_mask=True,
    )
