"""The cpp direct sparse convolution kernels against torch's convolution, over a grid that
reaches every tiling the forward kernel picks: row tiles of full-width vectors (output
widths that are multiples of 16 / 8 floats), row tiles of half-width vectors, and flat
tiles over the padded plane (any other width), with tail row blocks, fewer images than
threads (the channel split) and more (the per-image split), groups, dilation, padding and
strides (the phase planes).
The input gradient runs the same kernel on a transposed CSR the extension builds per call,
one phase plane of the input per stride offset (interleaved into the gradient when the
stride is above 1); it is checked against autograd here, and so is the scatter through a
cached transposed CSR that padding beyond the kernel's reach falls back to."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends
from tolerances import TOL, assert_close

from sparse_adv_fast import backends
from sparse_adv_fast.backends import _cpp_ops

pytestmark = pytest.mark.skipif("cpp" not in cpu_backends(), reason="needs a C++ compiler")

# (N, C, H, W, OC, kernel, padding, dilation, groups)
GRID = [
    (2, 3, 5, 32, 4, 3, 1, 1, 1),    # row tiles, 16-float vectors x 2, tail block of 1 row
    (3, 4, 9, 16, 5, 3, 1, 1, 1),    # 1 vector across, 8-row blocks + a tail
    (1, 2, 4, 48, 3, 3, 1, 1, 1),    # 3 vectors across: 1-vector column chunks; N < threads
    (2, 4, 6, 8, 4, 3, 1, 1, 2),     # half-width vectors (AVX-512) or full (AVX2); groups
    (2, 3, 7, 24, 2, 3, 1, 1, 1),    # 24 = 3 x 8
    (2, 5, 4, 4, 6, 3, 1, 1, 1),     # flat tiles: 4x4 planes (half-width vectors, AVX-512)
    (2, 3, 6, 7, 4, 3, 1, 1, 1),     # flat tiles: odd width (full-width vectors)
    (1, 2, 3, 1, 3, 1, 0, 1, 1),     # 1x1 kernel on a 1-wide plane
    (2, 4, 11, 13, 4, 5, 2, 1, 2),   # 5x5 kernel, groups
    (2, 3, 12, 32, 3, 3, 2, 2, 1),   # dilation 2 with padding 2
    (2, 3, 7, 17, 3, (3, 1), (1, 0), 1, 1),  # non-square kernel
    (2, 3, 8, 16, 3, 3, 0, 1, 1),    # no padding: output narrower than input (14 wide)
    (0, 3, 8, 16, 3, 3, 1, 1, 1),    # empty batch
    # batch lanes (a vector holds one pixel of many images): planes of at most 16 pixels
    # and a full vector of images; 17 leaves a partial last group of lanes
    (17, 6, 4, 4, 5, 3, 1, 1, 1),    # 4x4: one 4x4 tile
    (17, 4, 2, 2, 6, 3, 1, 1, 2),    # 2x2, groups
    (17, 3, 3, 5, 4, 3, 1, 1, 1),    # 3x5: 4- and 1-wide column tiles
    (16, 5, 4, 4, 7, 3, 1, 1, 1),    # one group of lanes (float): output channels split
    (17, 3, 1, 16, 2, 3, 1, 1, 1),   # one 16-wide row
    # lane buffers larger than a block (32 KB): input channels summed block by block
    (17, 40, 4, 4, 6, 3, 1, 1, 1),   # forward in 3 blocks
    (17, 6, 4, 4, 40, 3, 1, 1, 1),   # the input gradient's 40 channels in blocks
    (16, 40, 4, 4, 7, 3, 1, 1, 1),   # one group of lanes, output channels split, blocks
    (17, 70, 2, 2, 36, 3, 1, 1, 2),  # 2x2, groups: 35 channels a group, 2 blocks
]


def _case(n, c, h, w, oc, k, groups, density, dtype):
    kh, kw = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(n * 1000 + c * 100 + h * 10 + w)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    wt = torch.randn(oc, c // groups, kh, kw, generator=g, dtype=dtype)
    mask = torch.rand(wt.shape, generator=g) < density
    return x, wt, mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("density", [0.3, 1.0])
@pytest.mark.parametrize("shape", GRID, ids=lambda s: "x".join(map(str, s[:5])))
def test_stride1_forward_and_grad_input_match_torch(shape, density, dtype):
    n, c, h, w, oc, k, p, d, groups = shape
    ext = backends.cpp.loader("masked_conv2d")._ext
    x, wt, mask = _case(n, c, h, w, oc, k, groups, density, dtype)
    pad = [p, p] if isinstance(p, int) else list(p)
    conv = ([1, 1], pad, [d, d], groups)
    wm = torch.where(mask, wt, torch.zeros_like(wt))
    bias = torch.randn(oc, dtype=dtype)
    rowptr, col, val = _cpp_ops.csr(wt, mask, _cpp_ops.index_dtype(mask[0].numel()))
    y = ext.conv_forward(x, rowptr, col, val, list(wt.shape), bias, *conv)
    assert_close(y, F.conv2d(x, wm, bias, 1, pad, d, groups))

    xr = x.clone().requires_grad_()
    ref = F.conv2d(xr, wm, None, 1, pad, d, groups)
    gy = torch.randn_like(ref)
    ref.backward(gy)
    gx = ext.conv_grad_input_direct(gy, list(x.shape), rowptr, col, val, list(wt.shape),
                                    [1, 1], pad, [d, d], groups)
    assert_close(gx, xr.grad)


# (N, C, H, W, OC, kernel, stride, padding, dilation, groups)
STRIDED = [
    (2, 3, 32, 32, 4, 3, 2, 1, 1, 1),        # ResNet downsampling: 32 -> 16, row tiles
    (3, 4, 16, 16, 4, 1, 2, 0, 1, 2),        # 1x1 shortcut, groups
    (1, 2, 9, 11, 3, 3, 2, 1, 1, 1),         # odd sizes, flat tiles
    (2, 3, 10, 17, 2, (3, 2), (2, 3), (1, 0), (1, 2), 1),  # mixed strides and dilation
    (2, 2, 13, 13, 3, 5, 3, 2, 1, 1),        # stride 3, 5x5
    (2, 3, 12, 12, 4, 3, 2, 2, 2, 1),        # stride 2, dilation 2: odd phases never read
    (2, 2, 8, 8, 2, 3, 2, 4, 1, 1),          # padding wider than the kernel
    (1, 18, 9, 10, 4, 3, 2, 1, 1, 1),        # one image: input channels split, 3 a task
    (17, 5, 8, 8, 6, 3, 2, 1, 1, 1),         # 8x8 -> 4x4 (gradient over 4x4: batch lanes)
    (17, 4, 8, 7, 4, 1, 2, 0, 1, 2),         # 1x1 shortcut into 4x4, groups (lanes)
    (17, 40, 8, 8, 40, 3, 2, 1, 1, 1),       # both directions in channel blocks (lanes)
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", STRIDED, ids=lambda s: "x".join(map(str, s[:5])))
def test_strided_forward_and_grad_input_match_torch(shape, dtype):
    """Strided convolutions run the forward over phase planes; their input gradient by
    phase planes of the input (within the kernel's reach) and by the scatter through the
    cached transposed CSR both match autograd."""
    n, c, h, w, oc, k, s, p, d, groups = shape
    pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]  # noqa: E731
    ext = backends.cpp.loader("masked_conv2d")._ext
    x, wt, mask = _case(n, c, h, w, oc, k, groups, 0.4, dtype)
    conv = (pair(s), pair(p), pair(d), groups)
    wm = torch.where(mask, wt, torch.zeros_like(wt))
    bias = torch.randn(oc, dtype=dtype)
    rowptr, col, val = _cpp_ops.csr(wt, mask, _cpp_ops.index_dtype(mask[0].numel()))
    y = ext.conv_forward(x, rowptr, col, val, list(wt.shape), bias, *conv)
    assert_close(y, F.conv2d(x, wm, bias, *conv))
    xr = x.clone().requires_grad_()
    ref = F.conv2d(xr, wm, None, *conv)
    gy = torch.randn_like(ref)
    ref.backward(gy)
    rt, ct, vt = _cpp_ops.csr_t(wt, mask, groups)
    gx = ext.conv_grad_input(gy, list(x.shape), rt, ct, vt, list(wt.shape), *conv)
    assert_close(gx, xr.grad)
    kh, kw = wt.shape[2:]
    if conv[2][0] * (kh - 1) >= conv[1][0] and conv[2][1] * (kw - 1) >= conv[1][1]:
        gx = ext.conv_grad_input_direct(gy, list(x.shape), rowptr, col, val, list(wt.shape),
                                        *conv)
        assert_close(gx, xr.grad)


def test_forward_takes_a_noncontiguous_input_and_int32_columns():
    ext = backends.cpp.loader("masked_conv2d")._ext
    x, wt, mask = _case(2, 4, 6, 32, 3, 3, 1, 0.5, torch.float64)
    xs = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not xs.is_contiguous()
    rowptr, col, val = _cpp_ops.csr(wt, mask, torch.int32)
    y = ext.conv_forward(xs, rowptr, col, val, list(wt.shape), None, [1, 1], [1, 1], [1, 1], 1)
    assert_close(y, F.conv2d(x, torch.where(mask, wt, torch.zeros_like(wt)), None, 1, 1))


def test_direct_grad_input_refuses_padding_beyond_the_kernel():
    ext = backends.cpp.loader("masked_conv2d")._ext
    x, wt, mask = _case(1, 2, 5, 5, 2, 3, 1, 0.5, torch.float64)
    rowptr, col, val = _cpp_ops.csr(wt, mask)
    gy = torch.randn(1, 2, 9, 9, dtype=torch.float64)  # padding 3 on a 3x3 kernel
    with pytest.raises(RuntimeError, match="padding larger than the dilated kernel"):
        ext.conv_grad_input_direct(gy, list(x.shape), rowptr, col, val, list(wt.shape),
                                   [1, 1], [3, 3], [1, 1], 1)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [1, 3])
def test_op_grad_input_takes_either_path(padding, stride, monkeypatch):
    """Through the backend layer: padding within the kernel's reach runs the per-call
    transposed CSR (any stride), padding beyond it falls back to the cached transposed
    CSR; both agree with autograd, and only the fallback caches a transposed copy."""
    from sparse_adv_fast.ops import _cache

    monkeypatch.setattr(_cpp_ops, "CONV_SPARSE_DENSITY", 1.0)
    ext = backends.cpp.loader("masked_conv2d")._ext
    x, wt, mask = _case(2, 3, 6, 16, 4, 3, 1, 0.4, torch.float64)
    xr = x.clone().requires_grad_()
    wm = torch.where(mask, wt, torch.zeros_like(wt))
    ref = F.conv2d(xr, wm, None, stride, padding)
    gy = torch.randn_like(ref)
    ref.backward(gy)
    _cache.clear()
    gx = _cpp_ops.sparse_conv_grad_input(ext, gy, x, wt, mask,
                                         ([stride, stride], [padding, padding], [1, 1], 1))
    assert_close(gx, xr.grad)
    forms = [k for e in _cache._entries.values() for k in e.forms]
    assert any(k.startswith("csr_t") for k in forms) == (padding == 3), forms
    _cache.clear()


# A ReLU fused into the kernels (the attack path of conv -> relu): clamped as tiles are
# stored, the output gradient gated by the saved output as the input gradient pads it.
FUSED = [GRID[0], GRID[3], GRID[5], GRID[6], GRID[8], GRID[12], GRID[13], GRID[14]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", FUSED, ids=lambda s: "x".join(map(str, s[:5])))
def test_fused_relu_matches_torch_relu_of_the_convolution(shape, dtype):
    n, c, h, w, oc, k, p, d, groups = shape
    ext = backends.cpp.loader("masked_conv2d")._ext
    x, wt, mask = _case(n, c, h, w, oc, k, groups, 0.4, dtype)
    conv = ([1, 1], [p, p], [d, d], groups)
    wm = torch.where(mask, wt, torch.zeros_like(wt))
    bias = torch.randn(oc, dtype=dtype)
    bias[0] = float("nan")  # torch's relu keeps NaN: so must the fused one
    rowptr, col, val = _cpp_ops.csr(wt, mask, _cpp_ops.index_dtype(mask[0].numel()))
    xr = x.clone().requires_grad_()
    ref = torch.relu(F.conv2d(xr, wm, bias, *conv))
    y = ext.conv_forward(x, rowptr, col, val, list(wt.shape), bias, *conv, relu=True)
    torch.testing.assert_close(y, ref.detach(), **TOL[dtype], equal_nan=True)
    assert not bool((y < 0).any()) and bool(y[:, 0].isnan().all())

    gy = torch.randn_like(ref)
    ref.backward(gy)
    gx = ext.conv_grad_input_direct(gy, list(x.shape), rowptr, col, val, list(wt.shape),
                                    [1, 1], [p, p], [d, d], groups, gate=y)
    torch.testing.assert_close(gx, xr.grad, **TOL[dtype], equal_nan=True)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [1, 3])
def test_gated_grad_input_through_the_backend_layer(stride, padding):
    """``gate`` on either input-gradient path: the direct kernel gates while it pads, the
    scatter (padding beyond the kernel) is given the gated gradient; both match autograd
    through the ReLU."""
    ext = backends.cpp.loader("masked_conv2d")._ext
    x, wt, mask = _case(2, 3, 9, 16, 4, 3, 1, 0.4, torch.float64)
    conv = ([stride, stride], [padding, padding], [1, 1], 1)
    xr = x.clone().requires_grad_()
    ref = torch.relu(F.conv2d(xr, torch.where(mask, wt, torch.zeros_like(wt)), None, *conv))
    gy = torch.randn_like(ref)
    ref.backward(gy)
    y = _cpp_ops.sparse_conv_forward(ext, x, wt, mask, None, conv, relu=True)
    gx = _cpp_ops.sparse_conv_grad_input(ext, gy, x, wt, mask, conv, gate=y)
    assert_close(y, ref.detach())
    assert_close(gx, xr.grad)


def test_gate_of_another_shape_is_refused():
    ext = backends.cpp.loader("masked_conv2d")._ext
    x, wt, mask = _case(1, 2, 5, 5, 2, 3, 1, 0.5, torch.float64)
    rowptr, col, val = _cpp_ops.csr(wt, mask)
    gy = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="gate must match"):
        ext.conv_grad_input_direct(gy, list(x.shape), rowptr, col, val, list(wt.shape),
                                   [1, 1], [1, 1], [1, 1], 1, gate=gy[:, :1])
