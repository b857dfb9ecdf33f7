"""Triton kernels for ``masked_conv2d`` (contract in ``sparse_adv_fast/ops/masked_conv2d.py``).

Two paths, chosen by ``CONV_PATH`` (or ``SAF_TRITON_CONV=igemm|cudnn`` in the environment):

* ``"igemm"`` (default): implicit-GEMM kernels, no im2col buffer. ``forward`` and
  ``grad_input`` mask each weight tile as it is loaded; ``grad_weight`` writes exact zeros
  at pruned positions in its epilogue. Groups, stride, padding and dilation are handled by
  index arithmetic (a second launch axis runs the groups).
* ``"cudnn"``: a Triton elementwise kernel writes ``w ⊙ mask`` into the per-weight-version
  cache (an attack's many forwards build it once), then torch's convolution (cuDNN on a GPU)
  runs; ``grad_weight`` is torch's weight gradient masked by the same elementwise kernel.

Which is faster depends on the card and the layer; it could not be measured where this was
written (no GPU). To choose, run ``benchmarks/bench_triton.py -k conv`` on the target GPU:
compare forward, grad_input and grad_weight of both paths for VGG-16 / ResNet-18 CIFAR
layer shapes (batch 128, 3x3, 64..512 channels, 32x32..4x4 maps) at densities 1.0 and
0.1, fp32 and bf16. cuDNN is expected to win the dense-ish forward (Winograd, tensor
cores) and the small-spatial grad_weight (long reductions: the igemm grad_weight has no
split-K); igemm wins when the masked-copy pass dominates (tiny batches, attack forwards
with weights that change every call).
"""

from __future__ import annotations

import os

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

Conv = tuple[list[int], list[int], list[int], int]

#: ``"igemm"`` or ``"cudnn"`` (see the module docstring).
CONV_PATH = os.environ.get("SAF_TRITON_CONV", "igemm")
#: ``"bits"`` or ``"bytes"``: how the implicit-GEMM kernels read the mask.
MASK_FORMAT = "bits"

_CONFIGS = [
    triton.Config({"BLOCK_P": bp, "BLOCK_Q": bq, "BLOCK_R": br}, num_warps=w, num_stages=s)
    for bp, bq, br, w, s in (
        (64, 64, 32, 4, 4),   # first: the untuned default (fits float64 in shared memory)
        (128, 128, 32, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 32, 64, 4, 4),
        (32, 64, 64, 4, 3),
    )
]
_INTERPRET_CONFIG = triton.Config({"BLOCK_P": 32, "BLOCK_Q": 16, "BLOCK_R": 16})
_KEY = ["P", "Q", "R", "KH", "KW"]


def _tile_grid(meta, P, Q, groups):
    return (triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(Q, meta["BLOCK_Q"]), groups)


@triton.jit
def _tile_ids(P, Q, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    pid = tl.program_id(0)
    n_q = tl.cdiv(Q, BLOCK_Q)
    offs_p = (pid // n_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = (pid % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    return offs_p, offs_q


@tuned(_CONFIGS, key=_KEY, interpret_config=_INTERPRET_CONFIG)
@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, m_ptr, b_ptr, y_ptr,
    P, Q, R, H, W, OH, OW, KH, KW,
    sxn, sxc, sxh, sxw, sw0, sw1, sw2, sw3, syn, syc, syh, syw, s_m,
    st_h, st_w, pd_h, pd_w, dl_h, dl_w,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # y[n, g*Q + q, oh, ow] = sum_r x_patch[(n, oh, ow), r] * Wm[g*Q + q, r],
    # r = (ci, kh, kw) over this group's Cin/groups input channels
    g = tl.program_id(1)
    offs_p, offs_q = _tile_ids(P, Q, BLOCK_P, BLOCK_Q)
    in_p = offs_p < P
    in_q = offs_q < Q
    n = offs_p // (OH * OW)
    oh = (offs_p // OW) % OH
    ow = offs_p % OW
    co = g * Q + offs_q
    khw = KH * KW
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        in_r = rr < R
        ci = rr // khw
        kh = (rr % khw) // KW
        kw = rr % KW
        ih = oh[:, None] * st_h - pd_h + kh[None, :] * dl_h
        iw = ow[:, None] * st_w - pd_w + kw[None, :] * dl_w
        a_ok = (in_p[:, None] & in_r[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
        a = tl.load(
            x_ptr + n[:, None] * sxn + (g * (R // khw) + ci[None, :]) * sxc + ih * sxh + iw * sxw,
            mask=a_ok, other=0.0,
        )
        b_ok = in_r[:, None] & in_q[None, :]
        b = tl.load(
            w_ptr + co[None, :] * sw0 + ci[:, None] * sw1 + kh[:, None] * sw2 + kw[:, None] * sw3,
            mask=b_ok, other=0.0,
        )
        keep = load_mask(m_ptr, co[None, :], rr[:, None], s_m, b_ok, BITS)
        b = tl.where(keep, b, 0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + co, mask=in_q, other=0.0).to(ACC)[None, :]
    y_off = n[:, None] * syn + co[None, :] * syc + (oh * syh + ow * syw)[:, None]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=in_p[:, None] & in_q[None, :])


@tuned(_CONFIGS, key=_KEY, interpret_config=_INTERPRET_CONFIG)
@triton.jit
def _dgrad_kernel(
    gy_ptr, w_ptr, m_ptr, gx_ptr,
    P, Q, R, H, W, OH, OW, KH, KW,
    sgn, sgc, sgh, sgw, sw0, sw1, sw2, sw3, sxn, sxc, sxh, sxw, s_m,
    st_h, st_w, pd_h, pd_w, dl_h, dl_w,
    BITS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # gx[n, g*Q + q, ih, iw] = sum_r gy_patch[(n, ih, iw), r] * Wm[g*Cog + co, q, kh, kw],
    # r = (co, kh, kw); oh = (ih + pad - kh*dil) / stride where that divides exactly
    g = tl.program_id(1)
    offs_p, offs_q = _tile_ids(P, Q, BLOCK_P, BLOCK_Q)
    in_p = offs_p < P
    in_q = offs_q < Q
    n = offs_p // (H * W)
    ih = (offs_p // W) % H
    iw = offs_p % W
    khw = KH * KW
    cog = R // khw
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        in_r = rr < R
        co = g * cog + rr // khw
        kh = (rr % khw) // KW
        kw = rr % KW
        th = ih[:, None] + pd_h - kh[None, :] * dl_h
        tw = iw[:, None] + pd_w - kw[None, :] * dl_w
        # clamp before dividing so no negative operand reaches // or %
        th0 = tl.maximum(th, 0)
        tw0 = tl.maximum(tw, 0)
        oh = th0 // st_h
        ow = tw0 // st_w
        a_ok = (
            in_p[:, None] & in_r[None, :] & (th >= 0) & (tw >= 0)
            & (th0 % st_h == 0) & (tw0 % st_w == 0) & (oh < OH) & (ow < OW)
        )
        a = tl.load(
            gy_ptr + n[:, None] * sgn + co[None, :] * sgc + oh * sgh + ow * sgw,
            mask=a_ok, other=0.0,
        )
        b_ok = in_r[:, None] & in_q[None, :]
        b = tl.load(
            w_ptr + co[:, None] * sw0 + offs_q[None, :] * sw1 + kh[:, None] * sw2
            + kw[:, None] * sw3,
            mask=b_ok, other=0.0,
        )
        col = offs_q[None, :] * khw + (rr % khw)[:, None]
        keep = load_mask(m_ptr, co[:, None], col, s_m, b_ok, BITS)
        b = tl.where(keep, b, 0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)
    ci = g * Q + offs_q
    gx_off = n[:, None] * sxn + ci[None, :] * sxc + (ih * sxh + iw * sxw)[:, None]
    tl.store(gx_ptr + gx_off, acc.to(gx_ptr.dtype.element_ty),
             mask=in_p[:, None] & in_q[None, :])


@tuned(_CONFIGS, key=_KEY, interpret_config=_INTERPRET_CONFIG)
@triton.jit
def _wgrad_kernel(
    gy_ptr, x_ptr, m_ptr, gw_ptr,
    P, Q, R, H, W, OH, OW, KH, KW,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, sw0, sw1, sw2, sw3, s_m,
    st_h, st_w, pd_h, pd_w, dl_h, dl_w,
    BITS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # gw[g*P + p, ci, kh, kw] = mask * sum_r gy[n, g*P + p, oh, ow] * x_patch[r, (ci, kh, kw)],
    # r = (n, oh, ow)
    g = tl.program_id(1)
    offs_p, offs_q = _tile_ids(P, Q, BLOCK_P, BLOCK_Q)
    in_p = offs_p < P
    in_q = offs_q < Q
    khw = KH * KW
    cig = Q // khw
    co = g * P + offs_p
    ci = g * cig + offs_q // khw
    kh = (offs_q % khw) // KW
    kw = offs_q % KW
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        in_r = rr < R
        n = rr // (OH * OW)
        oh = (rr // OW) % OH
        ow = rr % OW
        a = tl.load(
            gy_ptr + co[:, None] * sgc + (n * sgn + oh * sgh + ow * sgw)[None, :],
            mask=in_p[:, None] & in_r[None, :], other=0.0,
        )
        ih = oh[:, None] * st_h - pd_h + kh[None, :] * dl_h
        iw = ow[:, None] * st_w - pd_w + kw[None, :] * dl_w
        b_ok = in_r[:, None] & in_q[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(
            x_ptr + n[:, None] * sxn + ci[None, :] * sxc + ih * sxh + iw * sxw,
            mask=b_ok, other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)
    c_ok = in_p[:, None] & in_q[None, :]
    keep = load_mask(m_ptr, co[:, None], offs_q[None, :], s_m, c_ok, BITS)
    acc = tl.where(keep, acc, 0.0)
    gw_off = co[:, None] * sw0 + ((offs_q // khw) * sw1 + kh * sw2 + kw * sw3)[None, :]
    tl.store(gw_ptr + gw_off, acc.to(gw_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _mask_mul_kernel(w_ptr, m_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    keep = tl.load(m_ptr + offs, mask=ok, other=0) != 0
    tl.store(out_ptr + offs, tl.where(keep, w, 0.0), mask=ok)


def apply_mask(w: Tensor, mask: Tensor) -> Tensor:
    """``w ⊙ mask`` in one Triton elementwise pass (exact zeros where ``mask`` is False)."""
    w_c = w.contiguous()
    m_c = mask.contiguous().view(torch.uint8)
    out = torch.empty_like(w_c)
    numel = w_c.numel()
    block = 1024
    if numel:
        _mask_mul_kernel[(triton.cdiv(numel, block),)](w_c, m_c, out, numel, BLOCK=block)
    return out


# ---- helpers ------------------------------------------------------------------------------
def _out_hw(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _geometry(x: Tensor, mask: Tensor, conv: Conv):
    stride, padding, dilation, groups = conv
    n, _, h, w = x.shape
    cout, cig, kh, kw = mask.shape
    oh = _out_hw(h, kh, stride[0], padding[0], dilation[0])
    ow = _out_hw(w, kw, stride[1], padding[1], dilation[1])
    return n, h, w, cout, cig, kh, kw, oh, ow, groups


def _conv_args(conv: Conv) -> tuple[int, ...]:
    stride, padding, dilation, _ = conv
    return (*stride, *padding, *dilation)


def _path() -> str:
    if CONV_PATH not in ("igemm", "cudnn"):
        raise ValueError(f"masked_conv2d (triton): CONV_PATH must be 'igemm' or 'cudnn', "
                         f"got {CONV_PATH!r}")
    return CONV_PATH


def _cached_masked_weight(w: Tensor, mask: Tensor) -> Tensor:
    from sparse_adv_fast.ops import _cache

    return _cache.get(w, mask, "triton_masked", lambda: apply_mask(w, mask))


def _grid(P: int, Q: int, groups: int):
    return lambda meta: _tile_grid(meta, P, Q, groups)


# ---- contract -----------------------------------------------------------------------------
def forward(x: Tensor, w: Tensor, mask: Tensor, b: Tensor | None, conv: Conv) -> Tensor:
    """``conv2d(x, w ⊙ mask, b)``; the mask is applied to weight tiles as they load."""
    check_dtype(x, "masked_conv2d")
    check_int32_indexable("masked_conv2d", x, w)
    stride, padding, dilation, groups = conv
    if _path() == "cudnn":
        return torch.nn.functional.conv2d(
            x, _cached_masked_weight(w, mask), b, stride, padding, dilation, groups
        )
    n, h, wd, cout, cig, kh, kw, oh, ow, groups = _geometry(x, mask, conv)
    y = torch.empty((n, cout, oh, ow), dtype=x.dtype, device=x.device)
    P, Q, R = n * oh * ow, cout // groups, cig * kh * kw
    if y.numel() == 0:
        return y
    m, s_m, bits = mask_operand(mask, MASK_FORMAT)
    _fwd_kernel[_grid(P, Q, groups)](
        x, w, m, b if b is not None else y, y,
        P, Q, R, h, wd, oh, ow, kh, kw,
        *x.stride(), *w.stride(), *y.stride(), s_m, *_conv_args(conv),
        BITS=bits, HAS_BIAS=b is not None, ACC=acc_dtype(x.dtype), PREC=dot_precision(x.dtype),
    )
    return y


def grad_input(gy: Tensor, x: Tensor, w: Tensor, mask: Tensor, conv: Conv) -> Tensor:
    """Gradient w.r.t. ``x`` through ``w ⊙ mask`` (weight tiles masked at load)."""
    check_dtype(gy, "masked_conv2d")
    check_int32_indexable("masked_conv2d", gy, x, w)
    stride, padding, dilation, groups = conv
    if _path() == "cudnn":
        return torch.ops.aten.convolution_backward(
            gy, x, _cached_masked_weight(w, mask), None, stride, padding, dilation, False,
            [0, 0], groups, [True, False, False],
        )[0]
    n, h, wd, cout, cig, kh, kw, oh, ow, groups = _geometry(x, mask, conv)
    gx = torch.empty(x.shape, dtype=gy.dtype, device=gy.device)
    P, Q, R = n * h * wd, cig, (cout // groups) * kh * kw
    if gx.numel() == 0:
        return gx
    m, s_m, bits = mask_operand(mask, MASK_FORMAT)
    _dgrad_kernel[_grid(P, Q, groups)](
        gy, w, m, gx,
        P, Q, R, h, wd, oh, ow, kh, kw,
        *gy.stride(), *w.stride(), *gx.stride(), s_m, *_conv_args(conv),
        BITS=bits, ACC=acc_dtype(gy.dtype), PREC=dot_precision(gy.dtype),
    )
    return gx


def grad_weight(gy: Tensor, x: Tensor, mask: Tensor, conv: Conv) -> Tensor:
    """Gradient w.r.t. ``w``, masked in the epilogue: exact zeros where ``mask`` is False."""
    check_dtype(gy, "masked_conv2d")
    check_int32_indexable("masked_conv2d", gy, x)
    stride, padding, dilation, groups = conv
    if _path() == "cudnn":
        gw = torch.ops.aten.convolution_backward(
            gy, x, x.new_empty(mask.shape), None, stride, padding, dilation, False, [0, 0],
            groups, [False, True, False],
        )[1]
        return apply_mask(gw, mask)
    n, h, wd, cout, cig, kh, kw, oh, ow, groups = _geometry(x, mask, conv)
    gw = torch.empty(mask.shape, dtype=gy.dtype, device=gy.device)
    P, Q, R = cout // groups, cig * kh * kw, n * oh * ow
    if gw.numel() == 0:
        return gw
    if R == 0:
        return gw.zero_()
    m, s_m, bits = mask_operand(mask, MASK_FORMAT)
    _wgrad_kernel[_grid(P, Q, groups)](
        gy, x, m, gw,
        P, Q, R, h, wd, oh, ow, kh, kw,
        *gy.stride(), *x.stride(), *gw.stride(), s_m, *_conv_args(conv),
        BITS=bits, ACC=acc_dtype(gy.dtype), PREC=dot_precision(gy.dtype),
    )
    return gw
