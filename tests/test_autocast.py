"""Half precision and autocast on every backend, against the torch reference.

* ``masked_conv2d`` / ``masked_linear`` under ``torch.autocast`` match the reference run in
  the same autocast region (the ops are opaque to autocast; ``functional`` casts for them);
* fp16 / bf16 tensors through ``masked_conv2d`` forward and both gradients;
* ``pgd_step`` and ``random_start`` with fp16 / bf16 tensors (the cpp CPU kernels compute
  half types in fp32; the cuda backend routes dtypes its conv kernels lack to cuDNN);
* the suite's references run with TF32 off.

Half-precision results are compared with the central table's entry for the dtype the
computation ran in (``tolerances.TOL``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import cpu_backends, requires_cuda
from tolerances import assert_close

import sparse_adv_fast as saf
from sparse_adv_fast import backends
from sparse_adv_fast.ops import op_module

ref_lin, ref_conv, ref_pgd = (op_module(n) for n in ("masked_linear", "masked_conv2d", "pgd_step"))
HALF = [torch.bfloat16, torch.float16]
CONV = {"stride": 1, "padding": 1}


def _conv_inputs(device: str, dtype: torch.dtype = torch.float32):
    """A ragged 3x3 conv (odd channels and map) at density 0.5, leaves requiring grad."""
    x = torch.randn(3, 5, 7, 9, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 5, 3, 3, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(6, device=device, dtype=dtype, requires_grad=True)
    return x, w, torch.rand(w.shape, device=device) < 0.5, b


def _grads(out: torch.Tensor, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of a fixed random projection of ``out`` (not a plain sum, which would hide
    a transposed grad_input)."""
    gen = torch.Generator(device=out.device).manual_seed(1)
    proj = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
    return torch.autograd.grad((out * proj).sum(), leaves)


def test_references_run_with_tf32_off():
    # set by conftest's autouse fixture, for every test of the suite
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False


# ---- autocast -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", cpu_backends())
def test_masked_conv2d_under_cpu_autocast(backend):
    x, w, m, b = _conv_inputs("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref_conv.reference(x, w, m, b, **CONV)
        with backends.using(backend):
            got = saf.functional.masked_conv2d(x, w, m, b, **CONV)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close(got, want)
    grads = _grads(got, x, w, b)
    for g, r in zip(grads, _grads(want, x, w, b), strict=True):
        assert_close(g, r, dtype=torch.bfloat16)  # fp32 leaves, bf16 arithmetic
    assert (grads[1][~m] == 0).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_masked_linear_under_cpu_autocast(backend):
    x = torch.randn(7, 33, requires_grad=True)
    w = torch.randn(10, 33, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    m = torch.rand(w.shape) < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref_lin.reference(x, w, m, b)
        with backends.using(backend):
            got = saf.functional.masked_linear(x, w, m, b)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close(got, want)
    for g, r in zip(_grads(got, x, w, b), _grads(want, x, w, b), strict=True):
        assert_close(g, r, dtype=torch.bfloat16)


def test_masked_layers_under_cpu_autocast_in_auto_mode():
    net = saf.sparsify(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                           torch.nn.Flatten(), torch.nn.Linear(4 * 36, 5)))
    saf.prune.random(net, 0.5)
    x = torch.rand(2, 3, 6, 6)
    dense = saf.densify(copy.deepcopy(net))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = net(x), dense(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close(got, want)


# ---- half-precision tensors through masked_conv2d -------------------------------------------
def _check_half_conv(device: str, backend: str, dtype: torch.dtype) -> None:
    x, w, m, b = _conv_inputs(device, dtype)
    want = ref_conv.reference(x, w, m, b, **CONV)
    with backends.using(backend):
        got = saf.ops.masked_conv2d(x, w, m, b, **CONV)
        grads = _grads(got, x, w, b)
    assert got.dtype == dtype
    assert_close(got, want)
    for g, r in zip(grads, _grads(want, x, w, b), strict=True):
        assert_close(g, r)
    assert (grads[1][~m] == 0).all()


# triton's half kernels are checked on a GPU (below): the CPU interpreter only emulates them
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
def test_half_precision_masked_conv2d_on_cpu(backend, dtype):
    _check_half_conv("cpu", backend, dtype)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
def test_half_precision_masked_conv2d_on_gpu(backend, dtype):
    if backends._reason(backend, torch.device("cuda")) is not None:
        pytest.skip(backends._reason(backend, torch.device("cuda")))
    _check_half_conv("cuda", backend, dtype)


# ---- pgd_step in half precision -------------------------------------------------------------
def _pgd_inputs(dtype: torch.dtype):
    x = torch.rand(4, 3, 5, 5, dtype=dtype)
    x_adv = (x + 0.02 * torch.randn_like(x)).clamp(0, 1)
    return x_adv, torch.randn_like(x), x


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend", cpu_backends())
def test_pgd_step_half_precision(backend, dtype, norm):
    xa, g, x = _pgd_inputs(dtype)
    eps = 8 / 255 if norm == "linf" else 0.5
    want = ref_pgd.step(xa, g, x, 2 / 255, eps, norm, 0.0, 1.0, torch.empty_like(x))
    with backends.using(backend):
        got = saf.ops.pgd_step(xa, g, x, alpha=2 / 255, eps=eps, norm=norm)
        inplace = xa.clone()
        saf.ops.pgd_step_(inplace, g, x, alpha=2 / 255, eps=eps, norm=norm)
    assert got.dtype == dtype
    assert_close(got, want)
    assert torch.equal(inplace, got)
    assert got.min() >= 0 and got.max() <= 1


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend", cpu_backends())
def test_random_start_half_precision(backend, dtype, norm):
    x = torch.rand(3, 2, 4, 4, dtype=dtype)
    eps = 8 / 255 if norm == "linf" else 0.5
    torch.manual_seed(5)
    with backends.using("torch"):
        want = saf.ops.random_start(x, eps=eps, norm=norm)
    torch.manual_seed(5)
    with backends.using(backend):
        got = saf.ops.random_start(x, eps=eps, norm=norm)
    assert got.dtype == dtype
    assert_close(got, want)
    assert got.min() >= 0 and got.max() <= 1


def test_cuda_backend_routes_dtypes_its_kernels_lack_to_the_reference():
    """Without a GPU: the routing wrapper itself, over a stand-in extension that, like the
    conv binding, takes float32 only."""
    from sparse_adv_fast.backends import cuda

    class FakeExt:
        calls: list[torch.dtype] = []

        def forward(self, x, w, mask, b, conv):
            if x.dtype != torch.float32:
                raise RuntimeError("masked_conv2d cuda: only float32 is supported")
            self.calls.append(x.dtype)
            return ref_conv.forward(x, w, mask, b, conv)

    routed = cuda._DtypeRouted(FakeExt(), cuda._dtypes("masked_conv2d"), ref_conv._REF)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, w, m, b = (t.detach() for t in _conv_inputs("cpu", dtype))
        assert_close(routed.forward(x, w, m, b, conv), ref_conv.reference(x, w, m, b, **CONV))
    assert FakeExt.calls == [torch.float32]
