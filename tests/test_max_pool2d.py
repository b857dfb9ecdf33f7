"""The attack path's window max pool against ``F.max_pool2d`` (aten): values and input
gradients equal bit for bit, ties and NaN included, and the settings it does not take
left to aten."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends

import sparse_adv_fast as saf
from sparse_adv_fast.ops import max_pool2d as M

pytestmark = pytest.mark.skipif("cpp" not in cpu_backends(), reason="needs a C++ compiler")


def _both(x: torch.Tensor, k: int, gy_seed: int = 1):
    """(value, input gradient) of the kernels and of aten for the same x and output grad."""
    assert M.tiling_kernel(x, k, k, 0, 1, False) == k
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = M.WindowMaxPool.apply(xa, k)
    ref = F.max_pool2d(xb, k)
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(gy_seed), dtype=x.dtype)
    (g,) = torch.autograd.grad(y, xa, gy)
    (gref,) = torch.autograd.grad(ref, xb, gy)
    return y, ref, g, gref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,k", [
    ((2, 3, 8, 8), 2), ((1, 1, 2, 2), 2), ((3, 5, 7, 9), 2),  # odd sizes: rows, cols left over
    ((2, 4, 9, 9), 3), ((2, 2, 10, 11), 3), ((1, 3, 12, 8), 4), ((4, 64, 4, 4), 2),
    ((2, 128, 2, 2), 2), ((0, 3, 8, 8), 2), ((32, 16, 32, 32), 2),
    # 16 windows a row or more: the gradient row by row
    ((2, 3, 35, 33), 2), ((2, 2, 50, 49), 3), ((1, 2, 64, 70), 4),
])
def test_values_and_gradients_equal_aten(shape, k, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    y, ref, g, gref = _both(x, k)
    assert torch.equal(y, ref) and torch.equal(g, gref)


def test_ties_nan_and_inf_pick_what_aten_picks():
    """Rounded values make ties in most windows; NaN (one or two in a window) and -inf
    windows pick the same element as aten, so the gradient lands in the same place."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (2, 3, 12, 12), generator=g).double()
    x[0, 0, 0, 1] = float("nan")
    x[0, 0, 2, 2] = x[0, 0, 3, 3] = float("nan")  # two NaN in one window: the later wins
    x[1, 2, 4:6, 4:6] = float("-inf")
    x[1, 1, 6, 7] = float("inf")
    y, ref, gx, gref = _both(x, 2)
    assert torch.equal(y.isnan(), ref.isnan())
    assert torch.equal(y.nan_to_num(), ref.nan_to_num())
    assert torch.equal(gx, gref)


def test_a_non_contiguous_input_is_left_to_aten():
    x = torch.randn(2, 3, 8, 8).transpose(2, 3)
    assert M.tiling_kernel(x, 2, 2, 0, 1, False) is None


@pytest.mark.parametrize("settings", [
    (3, 2, 0, 1, False),  # overlapping windows
    (2, 2, 1, 1, False),  # padding
    (2, 2, 0, 2, False),  # dilation
    (2, 2, 0, 1, True),   # ceil mode
    ((2, 3), (2, 3), 0, 1, False),  # non-square
    (17, 17, 0, 1, False),  # picks would not fit a byte
])
def test_settings_it_does_not_tile_are_left_to_aten(settings):
    assert M.tiling_kernel(torch.randn(1, 2, 40, 40), *settings) is None


def test_other_dtypes_and_the_forced_torch_backend_are_left_to_aten():
    x = torch.randn(1, 2, 8, 8)
    assert M.tiling_kernel(x.half(), 2, 2, 0, 1, False) is None
    assert M.tiling_kernel(x, 2, None, 0, 1, False) == 2  # stride None: the kernel's
    with saf.backends.using("torch"):
        assert M.tiling_kernel(x, 2, 2, 0, 1, False) is None


def test_bad_calls_raise_one_line_errors():
    ext = M._ext()
    with pytest.raises(ValueError, match="4-D"):
        ext.forward(torch.randn(3, 8, 8), 2)
    with pytest.raises(TypeError, match="float32, float64"):
        ext.forward(torch.randn(1, 1, 4, 4).half(), 2)
    with pytest.raises(ValueError, match="kernel"):
        ext.forward(torch.randn(1, 1, 4, 4), 0)
