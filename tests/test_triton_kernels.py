"""Triton kernels (``kernels/``) against the torch references, directly and via the registry.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
set by conftest before triton is imported; set again here so the module also runs alone).
The interpreter is slow, so shapes are tiny but ragged (not multiples of the blocks).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# on a GPU, tuning every tiny test shape over all configs would only cost compile time
os.environ.setdefault("SAF_TRITON_AUTOTUNE", "0")

import importlib  # noqa: E402

import pytest  # noqa: E402
from conftest import requires_cuda  # noqa: E402
from tolerances import assert_close  # noqa: E402

import sparse_adv_fast as saf  # noqa: E402
from sparse_adv_fast import backends  # noqa: E402
from sparse_adv_fast.ops import _cache, op_module  # noqa: E402

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_why = backends._reason("triton", DEVICE)
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(_why is not None, reason=f"triton cannot run here: {_why}"),
]

ref_lin, ref_conv, ref_pgd = (op_module(n) for n in ("masked_linear", "masked_conv2d", "pgd_step"))


def _kern(op: str):
    return importlib.import_module(f"sparse_adv_fast.kernels.{op}")


def _mask(shape, density: float) -> torch.Tensor:
    return torch.rand(shape, device=DEVICE) < density


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


# ---- shared helpers -----------------------------------------------------------------------
def test_pack_bits_layout_matches_definition():
    common = importlib.import_module("sparse_adv_fast.kernels._common")
    m = _mask((3, 70), 0.5)
    bits = common.pack_bits(m)
    assert bits.shape == (3, 3) and bits.dtype == torch.int32
    cols = torch.arange(70, device=DEVICE)
    words = bits.to(torch.int64)[:, cols // 32]
    unpacked = ((words >> (cols % 32)) & 1).bool()
    assert torch.equal(unpacked, m)
    assert (bits.to(torch.int64)[:, 2] >> 6 == 0).all()  # padding bits stay clear


def test_packed_mask_is_built_once_per_mask_version():
    k = _kern("masked_linear")
    x, w, m = _randn(3, 9), _randn(4, 9), _mask((4, 9), 0.5)
    _cache.stats.reset()
    k.forward(x, w, m, None)
    k.grad_input(_randn(3, 4), w, m)
    assert (_cache.stats.builds, _cache.stats.hits) == (1, 1)
    m[0, 0] = ~m[0, 0]  # in-place edit bumps the version: repack and use the new mask
    y = k.forward(x, w, m, None)
    assert _cache.stats.builds == 2
    assert_close(y, ref_lin.reference(x, w, m))


def test_operands_beyond_int32_offsets_are_refused():
    common = importlib.import_module("sparse_adv_fast.kernels._common")
    common.check_int32_indexable("op", torch.empty(2**31, device="meta"))  # last offset fits
    with pytest.raises(ValueError, match="beyond the kernels' int32 offsets"):
        common.check_int32_indexable("op", torch.empty(2, 2**30 + 1, device="meta"))


# ---- masked_linear ------------------------------------------------------------------------
LINEAR_CASES = [  # (M, K, N, density, mask format)
    (1, 33, 17, 0.5, "bits"),
    (20, 7, 33, 0.9, "bits"),
    (33, 40, 5, 0.0, "bits"),
    (6, 16, 16, 1.0, "bits"),
    (18, 35, 18, 0.5, "bytes"),
    (1, 9, 3, 1.0, "bytes"),
]


@pytest.mark.parametrize("M,K,N,density,fmt", LINEAR_CASES)
def test_masked_linear_kernels_match_reference(monkeypatch, M, K, N, density, fmt):
    k = _kern("masked_linear")
    monkeypatch.setattr(k, "MASK_FORMAT", fmt)
    x, w, b, gy = _randn(M, K), _randn(N, K), _randn(N), _randn(M, N)
    m = _mask((N, K), density)
    b = b if M % 2 else None  # both epilogues, with and without bias
    assert_close(k.forward(x, w, m, b), ref_lin.forward(x, w, m, b), msg="forward")
    assert_close(k.grad_input(gy, w, m), ref_lin.grad_input(gy, w, m), msg="grad_input")
    gw = k.grad_weight(gy, x, m)
    assert_close(gw, ref_lin.grad_weight(gy, x, m), msg="grad_weight")
    assert (gw[~m] == 0).all(), "grad_w must be exactly zero where pruned"


def test_masked_linear_float64():
    k = _kern("masked_linear")
    x, w, b, gy = (_randn(*s, dtype=torch.float64) for s in ((9, 19), (18, 19), (18,), (9, 18)))
    m = _mask(w.shape, 0.5)
    assert_close(k.forward(x, w, m, b), ref_lin.forward(x, w, m, b))
    assert_close(k.grad_input(gy, w, m), ref_lin.grad_input(gy, w, m))
    assert_close(k.grad_weight(gy, x, m), ref_lin.grad_weight(gy, x, m))


def test_masked_linear_masks_nonfinite_pruned_weights_and_strided_operands():
    k = _kern("masked_linear")
    w_store = _randn(12, 10)  # w = w_store.t(): a non-contiguous (10, 12) weight
    m = _mask((10, 12), 0.5)
    w = w_store.t()
    w[~m] = float("inf")  # pruned weights never reach the product, whatever they hold
    x, gy = _randn(6, 12), _randn(6, 10)
    wz = torch.where(m, w, 0.0)
    assert_close(k.forward(x, w, m, None), x @ wz.t())
    assert_close(k.grad_input(gy, w, m), gy @ wz)


def test_masked_linear_grad_weight_zeros_are_exact_even_with_nonfinite_products():
    k = _kern("masked_linear")
    x, gy = _randn(4, 5), _randn(4, 3)
    x[:, 0] = float("nan")  # column 0 of gy^T x is NaN everywhere
    m = torch.ones(3, 5, dtype=torch.bool, device=DEVICE)
    m[:, 0] = False
    gw = k.grad_weight(gy, x, m)
    assert (gw[:, 0] == 0).all()
    assert_close(gw[:, 1:], gy.t() @ x[:, 1:])


def test_masked_linear_via_registry_with_autograd():
    x = _randn(2, 3, 11).requires_grad_()
    w = _randn(7, 11).requires_grad_()
    b = _randn(7).requires_grad_()
    m = _mask((7, 11), 0.5)
    with backends.using("triton"):
        assert backends.resolve("masked_linear", DEVICE)[0] == "triton"
        y = saf.ops.masked_linear(x, w, m, b)
        gx, gw, gb = torch.autograd.grad(y.square().sum(), (x, w, b))
    yr = ref_lin.reference(x, w, m, b)
    rx, rw, rb = torch.autograd.grad(yr.square().sum(), (x, w, b))
    assert_close(y, yr)
    assert_close(gx, rx)
    assert_close(gw, rw)
    assert_close(gb, rb)
    assert (gw[~m] == 0).all()


def test_masked_linear_rejects_integer_tensors():
    k = _kern("masked_linear")
    x = torch.ones(2, 3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="dtype torch.int32 is not supported"):
        k.forward(x, x.new_ones(4, 3), torch.ones(4, 3, dtype=torch.bool, device=DEVICE), None)


# ---- masked_conv2d ------------------------------------------------------------------------
CONV_CASES = [  # (N, C, H, W, Cout, (kh, kw), stride, padding, dilation, groups, density)
    (2, 3, 7, 6, 5, (3, 3), [1, 1], [1, 1], [1, 1], 1, 0.5),
    (1, 4, 5, 5, 6, (3, 3), [2, 2], [1, 0], [1, 1], 2, 0.9),
    (2, 2, 7, 7, 3, (2, 3), [2, 1], [0, 2], [2, 1], 1, 1.0),
    (1, 3, 5, 6, 4, (1, 1), [1, 1], [0, 0], [1, 1], 1, 0.0),
]


def _conv_case(case, dtype=torch.float32):
    n, c, h, wd, cout, (kh, kw), s, p, d, g, density = case
    x, w = _randn(n, c, h, wd, dtype=dtype), _randn(cout, c // g, kh, kw, dtype=dtype)
    b = _randn(cout, dtype=dtype)
    m = _mask(w.shape, density)
    conv = (s, p, d, g)
    gy = torch.randn_like(ref_conv.forward(x, w, m, b, conv))
    return x, w, m, b, conv, gy


def _check_conv(k, case, dtype=torch.float32):
    x, w, m, b, conv, gy = _conv_case(case, dtype)
    assert_close(k.forward(x, w, m, b, conv), ref_conv.forward(x, w, m, b, conv), msg="forward")
    assert_close(k.grad_input(gy, x, w, m, conv), ref_conv.grad_input(gy, x, w, m, conv),
                 msg="grad_input")
    gw = k.grad_weight(gy, x, m, conv)
    assert_close(gw, ref_conv.grad_weight(gy, x, m, conv), msg="grad_weight")
    assert (gw[~m] == 0).all(), "grad_w must be exactly zero where pruned"


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[5]}s{c[6]}p{c[7]}g{c[9]}d{c[10]}")
def test_masked_conv2d_implicit_gemm_matches_reference(monkeypatch, case):
    k = _kern("masked_conv2d")
    monkeypatch.setattr(k, "CONV_PATH", "igemm")
    _check_conv(k, case)


@pytest.mark.slow
def test_masked_conv2d_implicit_gemm_byte_mask_and_float64(monkeypatch):
    k = _kern("masked_conv2d")
    monkeypatch.setattr(k, "CONV_PATH", "igemm")
    monkeypatch.setattr(k, "MASK_FORMAT", "bytes")
    _check_conv(k, CONV_CASES[1])
    monkeypatch.setattr(k, "MASK_FORMAT", "bits")
    _check_conv(k, CONV_CASES[0], torch.float64)


@pytest.mark.parametrize("case", CONV_CASES[:2])
def test_masked_conv2d_cudnn_path_matches_reference(monkeypatch, case):
    k = _kern("masked_conv2d")
    monkeypatch.setattr(k, "CONV_PATH", "cudnn")
    _check_conv(k, case)


def test_apply_mask_writes_exact_zeros():
    k = _kern("masked_conv2d")
    w = _randn(3, 2, 3, 3)
    m = _mask(w.shape, 0.5)
    w[~m] = float("nan")  # whatever a pruned position holds, the masked weight is 0 there
    assert torch.equal(k.apply_mask(w, m), torch.where(m, w, torch.zeros_like(w)))


def test_masked_conv2d_unknown_path_is_a_value_error(monkeypatch):
    k = _kern("masked_conv2d")
    monkeypatch.setattr(k, "CONV_PATH", "fft")
    x, w, m, b, conv, _ = _conv_case(CONV_CASES[3])
    with pytest.raises(ValueError, match="CONV_PATH must be 'igemm' or 'cudnn'"):
        k.forward(x, w, m, b, conv)


def test_masked_conv2d_via_registry_with_autograd():
    x = _randn(1, 2, 6, 5).requires_grad_()
    w = _randn(3, 2, 3, 3).requires_grad_()
    b = _randn(3).requires_grad_()
    m = _mask(w.shape, 0.5)
    with backends.using("triton"):
        y = saf.ops.masked_conv2d(x, w, m, b, stride=1, padding=1)
        gx, gw, gb = torch.autograd.grad(y.square().sum(), (x, w, b))
    yr = ref_conv.reference(x, w, m, b, stride=1, padding=1)
    rx, rw, rb = torch.autograd.grad(yr.square().sum(), (x, w, b))
    for got, want in ((y, yr), (gx, rx), (gw, rw), (gb, rb)):
        assert_close(got, want)
    assert (gw[~m] == 0).all()


# ---- pgd_step -----------------------------------------------------------------------------
PGD_SHAPES = [(1, 3, 5, 5), (3, 301)]  # 301 spans several blocks and partials (interpreter)


def _pgd_inputs(shape, dtype=torch.float32):
    x = torch.rand(shape, device=DEVICE, dtype=dtype)
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)  # some outside the eps-ball
    g = torch.randn_like(x)
    g.view(-1)[::7] = 0  # sign(0) = 0
    return x_adv, g, x


@pytest.mark.parametrize("shape", PGD_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pgd_linf_step_is_bit_exact(shape, dtype):
    k = _kern("pgd_step")
    xa, g, x = _pgd_inputs(shape, dtype)
    for clip in ((0.0, 1.0), (0.1, 0.9)):
        got = k.step(xa, g, x, 2 / 255, 8 / 255, "linf", *clip, torch.empty_like(x))
        want = ref_pgd.step(xa, g, x, 2 / 255, 8 / 255, "linf", *clip, torch.empty_like(x))
        assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("shape", PGD_SHAPES)
def test_pgd_l2_step_matches_reference(shape):
    k = _kern("pgd_step")
    xa, g, x = _pgd_inputs(shape)
    for eps in (0.05, 10.0):  # projection active / inactive
        got = k.step(xa, g, x, 0.1, eps, "l2", 0.0, 1.0, torch.empty_like(x))
        assert_close(got, ref_pgd.step(xa, g, x, 0.1, eps, "l2", 0.0, 1.0, torch.empty_like(x)))


def test_pgd_l2_projection_keeps_the_ball():
    k = _kern("pgd_step")
    xa, g, x = _pgd_inputs((3, 301))
    got = k.step(xa, g, x, 0.5, 0.05, "l2", -10.0, 10.0, torch.empty_like(x))
    assert ((got - x).flatten(1).norm(dim=1) <= 0.05 * (1 + 1e-5)).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_in_place(norm):
    k = _kern("pgd_step")
    xa, g, x = _pgd_inputs((3, 301))
    want = ref_pgd.step(xa, g, x, 0.01, 0.03, norm, 0.0, 1.0, torch.empty_like(x))
    buf = xa.clone()
    out = k.step(buf, g, x, 0.01, 0.03, norm, 0.0, 1.0, buf)
    assert out is buf
    if norm == "linf":
        assert torch.equal(buf, want)
    else:
        assert_close(buf, want)


def test_pgd_step_via_registry_in_place_and_out_of_place():
    xa, g, x = _pgd_inputs((2, 3, 4, 4))
    want = ref_pgd.step(xa, g, x, 2 / 255, 8 / 255, "linf", 0.0, 1.0, torch.empty_like(x))
    with backends.using("triton"):
        assert backends.resolve("pgd_step", DEVICE)[0] == "triton"
        assert torch.equal(saf.ops.pgd_step(xa, g, x, alpha=2 / 255, eps=8 / 255), want)
        buf = xa.clone()
        assert saf.ops.pgd_step_(buf, g, x, alpha=2 / 255, eps=8 / 255) is buf
    assert torch.equal(buf, want)


@pytest.mark.parametrize("shape", PGD_SHAPES)
def test_random_init_matches_reference_given_the_same_noise(shape):
    k = _kern("pgd_step")
    x = torch.rand(shape, device=DEVICE)
    b, d = x.shape[0], x[0].numel()
    noise = torch.rand(shape, device=DEVICE) * 2 - 1
    got = k.random_init(x, noise, 8 / 255, "linf", 0.0, 1.0)
    assert torch.equal(got, ref_pgd.random_init(x, noise, 8 / 255, "linf", 0.0, 1.0))
    noise = torch.randn(b, d + 1, device=DEVICE)
    noise[:, d] = torch.rand(b, device=DEVICE)
    noise[0, d] = 0.0  # u = 0: radius 0, the start is x itself
    got = k.random_init(x, noise, 0.5, "l2", -5.0, 5.0)
    assert_close(got, ref_pgd.random_init(x, noise, 0.5, "l2", -5.0, 5.0))
    assert_close(got[0], x[0])


def test_random_start_via_registry_equals_torch_backend_for_one_seed():
    x = torch.rand(2, 3, 4, 4, device=DEVICE)
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):
        torch.manual_seed(1)
        with backends.using("torch"):
            want = saf.ops.random_start(x, eps=eps, norm=norm)
        torch.manual_seed(1)
        with backends.using("triton"):
            got = saf.ops.random_start(x, eps=eps, norm=norm)
        if norm == "linf":
            assert torch.equal(got, want)
        else:
            assert_close(got, want)


def test_pgd_step_kernel_rejects_bad_input():
    k = _kern("pgd_step")
    xa, g, x = _pgd_inputs((2, 8))
    with pytest.raises(ValueError, match="contiguous"):
        k.step(xa.t(), g.t(), x.t(), 0.1, 0.1, "linf", 0.0, 1.0, torch.empty(8, 2))
    with pytest.raises(TypeError, match="dtypes differ"):
        k.step(xa, g.double(), x, 0.1, 0.1, "linf", 0.0, 1.0, torch.empty_like(x))
    with pytest.raises(ValueError, match="unknown norm"):
        k.step(xa, g, x, 0.1, 0.1, "l1", 0.0, 1.0, torch.empty_like(x))


# ---- half precision (GPU only: the interpreter has no fast half path worth testing) -------
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_gpu(dtype):
    lin = _kern("masked_linear")
    x, w, gy = _randn(37, 70, dtype=dtype), _randn(45, 70, dtype=dtype), _randn(37, 45, dtype=dtype)
    m = _mask(w.shape, 0.5)
    assert_close(lin.forward(x, w, m, None), ref_lin.forward(x, w, m, None))
    assert_close(lin.grad_input(gy, w, m), ref_lin.grad_input(gy, w, m))
    gw = lin.grad_weight(gy, x, m)
    assert_close(gw, ref_lin.grad_weight(gy, x, m))
    assert (gw[~m] == 0).all()
    xa, g, x0 = _pgd_inputs((4, 3, 8, 8), dtype)
    got = _kern("pgd_step").step(xa, g, x0, 2 / 255, 8 / 255, "linf", 0.0, 1.0,
                                 torch.empty_like(x0))
    assert torch.equal(got, ref_pgd.step(xa, g, x0, 2 / 255, 8 / 255, "linf", 0.0, 1.0,
                                         torch.empty_like(x0)))
