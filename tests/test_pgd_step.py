"""pgd_step on every backend: the torch reference as oracle (L-inf bit-exact, L2 within the
tolerance table), hand-computed cases, the in-place form, the random start, the
ball / clip-range invariants and bad-input errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cpu_backends, requires_cuda
from tolerances import assert_close

import sparse_adv_fast as saf
from sparse_adv_fast import backends
from sparse_adv_fast.ops import op_module

P = op_module("pgd_step")
CPU = cpu_backends()
NATIVE = [b for b in CPU if b != "torch"]  # compared with the reference (torch is the reference)

# The Triton interpreter is slow: small shapes only; cpp also gets one big enough for threads.
SHAPES = [(1, 5), (3, 7), (2, 3, 4, 5), (4, 1, 8, 8)]
BIG = (8, 3, 32, 32)


def _shapes(backend):
    if backend == "triton":
        return SHAPES[:3]
    return SHAPES + ([BIG] if backend == "cpp" else [])


def _impl(backend, device="cpu"):
    with backends.using(backend):
        return P._impl(torch.device(device))


def _inputs(shape, dtype=torch.float32, device="cpu", eps=8 / 255):
    x = torch.rand(shape, dtype=dtype, device=device)
    x_adv = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
    g = torch.randn_like(x)
    g.view(-1)[:: 3] = 0  # torch.sign(0) = 0: the step must leave these alone
    return x_adv, g, x


def _ref(x_adv, g, x, alpha, eps, norm, clip=(0.0, 1.0)):
    return P.step(x_adv, g, x, alpha, eps, norm, clip[0], clip[1], torch.empty_like(x))


# ---- reference agreement --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", NATIVE)
def test_linf_bit_exact(backend, dtype):
    for shape in _shapes(backend):
        x_adv, g, x = _inputs(shape, dtype)
        for alpha, eps, clip in [(2 / 255, 8 / 255, (0.0, 1.0)), (0.1, 0.03, (0.2, 0.9))]:
            with backends.using(backend):
                got = saf.ops.pgd_step(x_adv, g, x, alpha=alpha, eps=eps, clip=clip)
            want = _ref(x_adv, g, x, alpha, eps, "linf", clip)
            assert torch.equal(got, want), f"{backend} {shape} {dtype} alpha={alpha}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", NATIVE)
def test_l2_matches_reference(backend, dtype):
    for shape in _shapes(backend):
        x_adv, g, x = _inputs(shape, dtype, eps=0.5)
        for alpha, eps in [(0.1, 0.5), (2.0, 0.25), (0.01, 3.0)]:
            with backends.using(backend):
                got = saf.ops.pgd_step(x_adv, g, x, alpha=alpha, eps=eps, norm="l2")
            assert_close(got, _ref(x_adv, g, x, alpha, eps, "l2"), msg=f"{backend} {shape}")


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("backend", NATIVE)
def test_zero_gradient_rows_and_zero_eps(backend, norm):
    x_adv, g, x = _inputs((3, 2, 3, 3))
    g[1] = 0  # a whole sample without gradient
    for eps in (0.0, 0.05):
        with backends.using(backend):
            got = saf.ops.pgd_step(x_adv, g, x, alpha=0.02, eps=eps, norm=norm)
        assert_close(got, _ref(x_adv, g, x, 0.02, eps, norm))
    with backends.using(backend):
        got = saf.ops.pgd_step(x_adv, g, x, alpha=0.02, eps=0.0, norm=norm)
    assert torch.equal(got, x)  # eps = 0 projects back onto x (x lies inside the clip range)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("backend", NATIVE)
def test_non_contiguous_inputs(backend, norm):
    x_adv, g, x = (t.transpose(1, 3) for t in _inputs((2, 3, 4, 5)))
    with backends.using(backend):
        got = saf.ops.pgd_step(x_adv, g, x, alpha=0.05, eps=0.1, norm=norm)
    want = _ref(x_adv.contiguous(), g.contiguous(), x.contiguous(), 0.05, 0.1, norm)
    assert_close(got, want)


# ---- in-place form ----------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("backend", CPU)
def test_in_place(backend, norm):
    x_adv, g, x = _inputs((3, 2, 4, 4))
    want = _ref(x_adv, g, x, 0.05, 0.1, norm)
    buf = x_adv.clone()
    ptr = buf.data_ptr()
    with backends.using(backend):
        got = saf.ops.pgd_step_(buf, g, x, alpha=0.05, eps=0.1, norm=norm)
    assert got is buf and buf.data_ptr() == ptr
    if norm == "linf":
        assert torch.equal(buf, want)
    else:
        assert_close(buf, want)


# ---- hand-computed cases ----------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU)
def test_linf_hand_case(backend):
    # dyadic values: every sum below is exact in fp32
    x = torch.tensor([[0.5, 0.5, 0.0, 1.0, 0.5]])
    x_adv = torch.tensor([[0.5, 0.625, 0.0, 1.0, 0.5625]])
    g = torch.tensor([[2.0, -3.0, -1.0, 1.0, 0.0]])
    with backends.using(backend):
        got = saf.ops.pgd_step(x_adv, g, x, alpha=0.25, eps=0.125)
    # 0.75 -> ball top 0.625; 0.375 = ball bottom; -0.25 -> -0.125 -> clip 0;
    # 1.25 -> 1.125 -> clip 1; zero gradient keeps 0.5625
    assert got.tolist() == [[0.625, 0.375, 0.0, 1.0, 0.5625]]


@pytest.mark.parametrize("backend", CPU)
def test_l2_hand_case(backend):
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    x_adv = torch.tensor([[0.0, 0.0], [1.0, 0.2]])
    g = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    # sample 0: unit step to (0.6, 0.8), radius 1 > eps 0.5 -> scaled to (0.3, 0.4)
    # sample 1: unit step along +y to (1, 1.2), radius 0.2 < eps -> kept
    with backends.using(backend):
        got = saf.ops.pgd_step(x_adv, g, x, alpha=1.0, eps=0.5, norm="l2", clip=(-9, 9))
    assert_close(got, torch.tensor([[0.3, 0.4], [1.0, 1.2]]))


@pytest.mark.parametrize("backend", CPU)
def test_random_init_hand_cases(backend):
    impl = _impl(backend)
    x = torch.tensor([[0.5, 0.5, 0.0, 0.9]])
    noise = torch.tensor([[1.0, -1.0, 0.5, 1.0]])
    got = impl.random_init(x, noise, 0.25, "linf", 0.0, 1.0)
    assert got.tolist() == [[0.75, 0.25, 0.125, 1.0]]
    # L2: direction (3, 4)/5, u = 0.25, d = 2 -> radius 0.2 * sqrt(0.25) = 0.1
    x2 = torch.tensor([[0.5, 0.5]])
    noise2 = torch.tensor([[3.0, 4.0, 0.25]])
    got2 = impl.random_init(x2, noise2, 0.2, "l2", 0.0, 1.0)
    assert_close(got2, torch.tensor([[0.56, 0.58]]))


# ---- random start -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", NATIVE)
def test_random_init_matches_reference(backend, dtype):
    for shape in _shapes(backend):
        x = torch.rand(shape, dtype=dtype)
        b, d = shape[0], math.prod(shape[1:])
        noise = torch.rand(shape, dtype=dtype) * 2 - 1
        got = _impl(backend).random_init(x, noise, 8 / 255, "linf", 0.0, 1.0)
        assert torch.equal(got, P.random_init(x, noise, 8 / 255, "linf", 0.0, 1.0))
        noise2 = torch.randn(b, d + 1, dtype=dtype)
        noise2[:, d] = torch.rand(b, dtype=dtype)
        got2 = _impl(backend).random_init(x, noise2, 0.5, "l2", 0.0, 1.0)
        assert_close(got2, P.random_init(x, noise2, 0.5, "l2", 0.0, 1.0))


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("backend", NATIVE)
def test_random_start_public_api_same_noise(backend, norm):
    x = torch.rand(3, 2, 4, 4)

    def start():
        gen = torch.Generator().manual_seed(7)
        return saf.ops.random_start(x, eps=0.1, norm=norm, generator=gen)

    with backends.using(backend):
        got = start()
    with backends.using("torch"):
        want = start()
    if norm == "linf":
        assert torch.equal(got, want)
    else:
        assert_close(got, want)


# ---- invariants -------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("backend", CPU)
def test_outputs_in_ball_and_clip_range(backend, norm):
    lo, hi, eps = 0.1, 0.8, 0.2
    x = torch.rand(4, 3, 5, 5) * (hi - lo) + lo
    x_adv = x + torch.randn_like(x)  # far outside the ball: the projection must catch it
    g = torch.randn_like(x)
    with backends.using(backend):
        out = saf.ops.pgd_step(x_adv, g, x, alpha=0.5, eps=eps, norm=norm, clip=(lo, hi))
        start = saf.ops.random_start(x, eps=eps, norm=norm, clip=(lo, hi))
    for t in (out, start):
        assert t.min() >= lo and t.max() <= hi
        delta = (t - x).flatten(1)
        if norm == "linf":
            assert delta.abs().max() <= eps + 1e-6
        else:
            assert delta.norm(dim=1).max() <= eps * (1 + 1e-5)


# ---- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"norm": "l3"}, "unknown norm"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"alpha": -0.1}, "alpha must be > 0"),
        ({"eps": -1.0}, "eps must be a finite number"),
        ({"eps": float("nan")}, "eps must be a finite number"),
        ({"eps": float("inf")}, "eps must be a finite number"),
        ({"clip": (1.0, 0.0)}, "lo < hi"),
    ],
)
@pytest.mark.parametrize("backend", CPU)
def test_bad_scalars(backend, kwargs, match):
    x_adv, g, x = _inputs((2, 3))
    args = {"alpha": 0.1, "eps": 0.1, "norm": "linf"} | kwargs
    with backends.using(backend), pytest.raises(ValueError, match=match):
        saf.ops.pgd_step(x_adv, g, x, **args)


@pytest.mark.parametrize("backend", CPU)
def test_shape_mismatch(backend):
    x_adv, g, x = _inputs((2, 3))
    with backends.using(backend), pytest.raises(ValueError, match="one shape"):
        saf.ops.pgd_step(x_adv, g[:, :2], x, alpha=0.1, eps=0.1)


@pytest.mark.skipif("cpp" not in CPU, reason="no C++ compiler")
def test_native_binding_rejects_bad_tensors():
    ext = _impl("cpp")
    x_adv, g, x = _inputs((2, 4))
    out = torch.empty_like(x)
    with pytest.raises(TypeError, match="dtype"):
        ext.step(x_adv, g.double(), x, 0.1, 0.1, "linf", 0.0, 1.0, out)
    i = torch.zeros(2, 4, dtype=torch.int32)  # half types are supported: tests/test_autocast.py
    with pytest.raises(TypeError, match="not supported"):
        ext.step(i, i, i, 0.1, 0.1, "linf", 0.0, 1.0, i)
    with pytest.raises(ValueError, match="contiguous"):
        ext.step(x_adv, g, x, 0.1, 0.1, "linf", 0.0, 1.0, torch.empty(4, 2).t())
    with pytest.raises(ValueError, match="shape"):
        ext.step(x_adv, g, x, 0.1, 0.1, "linf", 0.0, 1.0, torch.empty(2, 5))
    with pytest.raises(ValueError, match="unknown norm"):
        ext.step(x_adv, g, x, 0.1, 0.1, "l1", 0.0, 1.0, out)
    with pytest.raises(ValueError, match="L2 noise needs shape"):
        ext.random_init(x, torch.zeros(2, 4), 0.1, "l2", 0.0, 1.0)
    # the cuda flavour's stream keyword is accepted (and unused) for CPU tensors
    got = ext.step(x_adv, g, x, 0.1, 0.1, "linf", 0.0, 1.0, out, stream=0)
    assert torch.equal(got, _ref(x_adv, g, x, 0.1, 0.1, "linf"))


# ---- CUDA -------------------------------------------------------------------------------
CUDA_BACKENDS = ["cuda", "triton"]


def _cuda_backend_or_skip(backend):
    why = backends._reason(backend, torch.device("cuda"))
    if why is not None:
        pytest.skip(why)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_linf_bit_exact(backend, dtype):
    _cuda_backend_or_skip(backend)
    # odd sizes (scalar tails), a misaligned view (no 128-bit loads), and a large batch
    for shape in [(3, 7), (2, 3, 5, 5), (256, 3, 32, 32), (70000, 3)]:
        x_adv, g, x = _inputs(shape, dtype, "cuda")
        views = [(x_adv, g, x)]
        if shape == (3, 7):
            flat = [torch.cat([t.new_zeros(1), t.flatten()])[1:].view(shape) for t in (x_adv, g, x)]
            views.append(tuple(flat))
        for xa_, g_, x_ in views:
            with backends.using(backend):
                got = saf.ops.pgd_step(xa_, g_, x_, alpha=2 / 255, eps=8 / 255)
            assert torch.equal(got, _ref(xa_, g_, x_, 2 / 255, 8 / 255, "linf")), (shape, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_l2_and_random_init(backend, dtype):
    _cuda_backend_or_skip(backend)
    for shape in [(3, 7), (2, 3, 5, 5), (64, 3, 32, 32), (70000, 3)]:
        x_adv, g, x = _inputs(shape, dtype, "cuda", eps=0.5)
        with backends.using(backend):
            got = saf.ops.pgd_step(x_adv, g, x, alpha=0.1, eps=0.5, norm="l2")
            buf = x_adv.clone()
            saf.ops.pgd_step_(buf, g, x, alpha=0.1, eps=0.5, norm="l2")
            impl = P._impl(torch.device("cuda"))
        want = _ref(x_adv, g, x, 0.1, 0.5, "l2")
        assert_close(got, want, msg=str(shape))
        assert_close(buf, want, msg=str(shape))
        b, d = shape[0], math.prod(shape[1:])
        noise = torch.rand(shape, dtype=dtype, device="cuda") * 2 - 1
        got = impl.random_init(x, noise, 8 / 255, "linf", 0.0, 1.0)
        assert torch.equal(got, P.random_init(x, noise, 8 / 255, "linf", 0.0, 1.0))
        noise2 = torch.randn(b, d + 1, dtype=dtype, device="cuda")
        noise2[:, d] = torch.rand(b, dtype=dtype, device="cuda")
        got2 = impl.random_init(x, noise2, 0.5, "l2", 0.0, 1.0)
        assert_close(got2, P.random_init(x, noise2, 0.5, "l2", 0.0, 1.0))
