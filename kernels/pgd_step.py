"""Triton kernels for ``pgd_step`` (contract in ``sparse_adv_fast/ops/pgd_step.py``).

* L∞ step: one elementwise pass reading ``x_adv``, ``grad``, ``x`` and writing ``out``,
  with torch's float operation order and roundings, so it equals the reference bit for bit
  (half types compute each op in float32 and round after it, as torch's opmath does).
* L2 step: a per-sample reduction kernel writes partial sums of squares ``(B, n_parts)``;
  it runs twice (``‖g‖``, then ``‖x_adv + α·g/‖g‖ - x‖``, recomputing the step on the fly),
  then the elementwise pass projects and clips. Partials keep the sums deterministic (no
  atomics) and keep the whole card busy for small batches.
* ``random_init``: the same two kernels on the noise (direction norm, then the scaled start).

``out`` may be ``x_adv`` itself: every pass reads an element before it writes that element
and no pass reads what another program writes, so the in-place form is safe.
Scalars travel as float64 and are rounded to the compute type inside the kernel, as torch
rounds a Python scalar to its opmath type. The L∞ kernels are compiled without FMA
contraction (``enable_fp_fusion=False``) so that ``x + ε·noise`` rounds the product first,
as torch's two separate ops do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, check_dtype

_TINY = 1e-12  # same guard as the reference
# Elementwise block; the reduction partial covers _PART_ITERS blocks (one program each).
_BLOCK = 128 if INTERPRET else 2048
_PART_ITERS = 2 if INTERPRET else 4
_MAX_PARTS = 1024
_NUM_WARPS = 8


@triton.jit
def _scalar(v, dtype: tl.constexpr, BLOCK: tl.constexpr):
    # splat as fp64 then round: works whether ``v`` is a Python float (interpreter) or the
    # kernel's fp64 scalar argument (compiled)
    return tl.full([BLOCK], v, tl.float64).to(dtype)


@triton.jit
def _round(v, dtype: tl.constexpr, CDT: tl.constexpr):
    # round to the storage type and back, as torch rounds after each op for half types
    return v.to(dtype).to(CDT)


@triton.jit
def _linf_step_kernel(
    xa_ptr, g_ptr, x_ptr, out_ptr, numel,
    alpha: tl.float64, eps: tl.float64, lo: tl.float64, hi: tl.float64,
    CDT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    dt = out_ptr.dtype.element_ty
    xa = tl.load(xa_ptr + offs, mask=ok, other=0.0).to(CDT)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(CDT)
    sgn = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0)).to(CDT)
    step = _round(_scalar(alpha, CDT, BLOCK) * sgn, dt, CDT)
    nxt = _round(xa + step, dt, CDT)
    low = _round(x - _scalar(eps, CDT, BLOCK), dt, CDT)
    high = _round(x + _scalar(eps, CDT, BLOCK), dt, CDT)
    nxt = tl.maximum(nxt, low, propagate_nan=tl.PropagateNan.ALL)
    nxt = tl.minimum(nxt, high, propagate_nan=tl.PropagateNan.ALL)
    nxt = tl.clamp(nxt, _scalar(lo, CDT, BLOCK), _scalar(hi, CDT, BLOCK),
                   propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + offs, nxt.to(dt), mask=ok)


@triton.jit
def _row_norm(part_ptr, row, n_parts, PARTS: tl.constexpr):
    p = tl.arange(0, PARTS)
    return tl.sqrt(tl.sum(tl.load(part_ptr + row * n_parts + p, mask=p < n_parts, other=0.0)))


@triton.jit
def _sumsq_kernel(
    a_ptr, g_ptr, x_ptr, part_ptr, gpart_ptr, d, row_stride, n_parts,
    alpha: tl.float64,
    MODE: tl.constexpr,   # 0: sum a^2;  1: sum (a + alpha/(|g|+tiny) * g - x)^2
    TINY: tl.constexpr, CDT: tl.constexpr, PARTS: tl.constexpr, ITERS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    base = row * row_stride
    if MODE == 1:
        scale = _scalar(alpha, CDT, 1) / (_row_norm(gpart_ptr, row, n_parts, PARTS) + TINY)
    acc = tl.zeros([BLOCK], dtype=CDT)
    for i in tl.static_range(ITERS):
        offs = (part * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < d
        v = tl.load(a_ptr + base + offs, mask=ok, other=0.0).to(CDT)
        if MODE == 1:
            g = tl.load(g_ptr + base + offs, mask=ok, other=0.0).to(CDT)
            x = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(CDT)
            v = tl.where(ok, (v + scale * g) - x, 0.0)
        acc += v * v
    tl.store(part_ptr + row * n_parts + part, tl.sum(acc))


@triton.jit
def _l2_step_kernel(
    xa_ptr, g_ptr, x_ptr, out_ptr, gpart_ptr, dpart_ptr, d, n_parts,
    alpha: tl.float64, eps: tl.float64, lo: tl.float64, hi: tl.float64,
    TINY: tl.constexpr, CDT: tl.constexpr, PARTS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < d
    base = row * d
    step = _scalar(alpha, CDT, 1) / (_row_norm(gpart_ptr, row, n_parts, PARTS) + TINY)
    proj = tl.minimum(
        _scalar(eps, CDT, 1) / (_row_norm(dpart_ptr, row, n_parts, PARTS) + TINY), 1.0
    )
    xa = tl.load(xa_ptr + base + offs, mask=ok, other=0.0).to(CDT)
    g = tl.load(g_ptr + base + offs, mask=ok, other=0.0).to(CDT)
    x = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(CDT)
    nxt = x + proj * ((xa + step * g) - x)
    nxt = tl.clamp(nxt, _scalar(lo, CDT, BLOCK), _scalar(hi, CDT, BLOCK),
                   propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + base + offs, nxt.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _linf_init_kernel(
    x_ptr, n_ptr, out_ptr, numel, eps: tl.float64, lo: tl.float64, hi: tl.float64,
    CDT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    dt = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(CDT)
    nz = tl.load(n_ptr + offs, mask=ok, other=0.0).to(CDT)
    v = _round(x + _round(_scalar(eps, CDT, BLOCK) * nz, dt, CDT), dt, CDT)
    v = tl.clamp(v, _scalar(lo, CDT, BLOCK), _scalar(hi, CDT, BLOCK),
                 propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + offs, v.to(dt), mask=ok)


@triton.jit
def _l2_init_kernel(
    x_ptr, n_ptr, out_ptr, npart_ptr, d, n_parts, eps: tl.float64, lo: tl.float64,
    hi: tl.float64, TINY: tl.constexpr, CDT: tl.constexpr, PARTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < d
    nrow = n_ptr + row * (d + 1)
    # radius eps * u^(1/d), u = |noise[row, d]| clamped to 1 (u = 0 gives radius 0)
    u = tl.minimum(tl.abs(tl.load(nrow + d + tl.zeros([1], tl.int32)).to(CDT)), 1.0)
    root = tl.exp2(tl.log2(tl.where(u > 0, u, 1.0)) / d)  # no log2(0) evaluated
    radius = _scalar(eps, CDT, 1) * tl.where(u > 0, root, 0.0)
    scale = radius / (_row_norm(npart_ptr, row, n_parts, PARTS) + TINY)
    x = tl.load(x_ptr + row * d + offs, mask=ok, other=0.0).to(CDT)
    nz = tl.load(nrow + offs, mask=ok, other=0.0).to(CDT)
    v = tl.clamp(x + nz * scale, _scalar(lo, CDT, BLOCK), _scalar(hi, CDT, BLOCK),
                 propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + row * d + offs, v.to(out_ptr.dtype.element_ty), mask=ok)


# ---- launch helpers ---------------------------------------------------------------------
def _cdt(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _parts(d: int) -> tuple[int, int]:
    """``(n_parts, iters)``: per-sample partials, each over ``iters`` blocks."""
    n_blocks = triton.cdiv(d, _BLOCK)
    iters = max(_PART_ITERS, triton.cdiv(n_blocks, _MAX_PARTS))
    return triton.cdiv(n_blocks, iters), iters


def _sumsq(a: Tensor, d: int, row_stride: int, *, grad: Tensor | None = None,
           x: Tensor | None = None, gpart: Tensor | None = None, alpha: float = 0.0) -> Tensor:
    """Per-sample partial sums of squares ``(B, n_parts)`` of ``a`` (``MODE 0``) or of the
    unprojected L2 step's offset from ``x`` (``MODE 1``)."""
    b = a.shape[0]
    n_parts, iters = _parts(d)
    part = torch.empty((b, n_parts), dtype=torch.float64 if a.dtype == torch.float64
                       else torch.float32, device=a.device)
    mode = 0 if grad is None else 1
    _sumsq_kernel[(b, n_parts)](
        a, grad if mode else a, x if mode else a, part, gpart if mode else part,
        d, row_stride, n_parts, alpha,
        MODE=mode, TINY=_TINY, CDT=_cdt(a.dtype), PARTS=triton.next_power_of_2(n_parts),
        ITERS=iters, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )
    return part


def _check(*ts: Tensor) -> None:
    for t in ts:
        check_dtype(t, "pgd_step")
        if not t.is_contiguous():
            raise ValueError("pgd_step (triton): inputs must be contiguous")
    if len({t.dtype for t in ts}) != 1:
        raise TypeError(f"pgd_step (triton): dtypes differ: {[t.dtype for t in ts]}")


# ---- contract -----------------------------------------------------------------------------
def step(x_adv: Tensor, grad: Tensor, x: Tensor, alpha: float, eps: float, norm: str,
         lo: float, hi: float, out: Tensor) -> Tensor:
    """One PGD step into ``out`` (which may be ``x_adv``); see the module docstring."""
    _check(x_adv, grad, x, out)
    numel = x.numel()
    if numel == 0:
        return out
    if norm == "linf":
        _linf_step_kernel[(triton.cdiv(numel, _BLOCK),)](
            x_adv, grad, x, out, numel, alpha, eps, lo, hi,
            CDT=_cdt(x.dtype), BLOCK=_BLOCK, num_warps=_NUM_WARPS, enable_fp_fusion=False,
        )
        return out
    if norm != "l2":
        raise ValueError(f"pgd_step (triton): unknown norm {norm!r}")
    b, d = x.shape[0], numel // x.shape[0]
    gpart = _sumsq(grad, d, d)
    dpart = _sumsq(x_adv, d, d, grad=grad, x=x, gpart=gpart, alpha=alpha)
    _l2_step_kernel[(b, triton.cdiv(d, _BLOCK))](
        x_adv, grad, x, out, gpart, dpart, d, gpart.shape[1], alpha, eps, lo, hi,
        TINY=_TINY, CDT=_cdt(x.dtype), PARTS=triton.next_power_of_2(gpart.shape[1]),
        BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )
    return out


def random_init(x: Tensor, noise: Tensor, eps: float, norm: str, lo: float, hi: float) -> Tensor:
    """Random start in the ``eps``-ball around ``x`` from the given ``noise`` (see contract)."""
    _check(x, noise)
    out = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out
    if norm == "linf":
        _linf_init_kernel[(triton.cdiv(numel, _BLOCK),)](
            x, noise, out, numel, eps, lo, hi, CDT=_cdt(x.dtype), BLOCK=_BLOCK,
            num_warps=_NUM_WARPS, enable_fp_fusion=False,
        )
        return out
    if norm != "l2":
        raise ValueError(f"pgd_step (triton): unknown norm {norm!r}")
    b, d = x.shape[0], numel // x.shape[0]
    if noise.numel() != b * (d + 1):
        raise ValueError(f"pgd_step (triton): L2 noise must hold B*(d+1) = {b * (d + 1)} "
                         f"values, got {noise.numel()}")
    npart = _sumsq(noise, d, d + 1)
    _l2_init_kernel[(b, triton.cdiv(d, _BLOCK))](
        x, noise, out, npart, d, npart.shape[1], eps, lo, hi,
        TINY=_TINY, CDT=_cdt(x.dtype), PARTS=triton.next_power_of_2(npart.shape[1]),
        BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )
    return out
