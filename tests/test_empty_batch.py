"""An empty batch (B = 0) through every op, direction and CPU backend (issue 8, item 7).

Forward outputs and input gradients are empty with the right shape and dtype, the weight
gradient of an empty batch is exactly zero (pruned positions included), and nothing
crashes: the cpp CSR input gradient used to divide by zero (SIGFPE) when splitting an
empty batch over threads. The oracle is torch autograd through ``F.linear`` /
``F.conv2d`` of ``w * mask``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends
from test_mask_writes import forced_path
from tolerances import assert_close

import sparse_adv_fast as saf

PATHS = ["torch", "cpp-dense", "cpp-sparse", "triton"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    with forced_path(request.param, monkeypatch):
        yield request.param


def _check_against_oracle(op, oracle, x, w, mask, b) -> None:
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y, y_ref = op(xs, ws, mask, bs), oracle(xr, wr * mask, br)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    gy = torch.randn_like(y_ref)
    y.backward(gy)
    y_ref.backward(gy)
    assert xs.grad.shape == x.shape and xs.grad.numel() == 0
    assert torch.equal(ws.grad, torch.zeros_like(w)), "grad_w of an empty batch is exactly 0"
    assert torch.equal(bs.grad, torch.zeros_like(b))
    assert_close(ws.grad, wr.grad)


@pytest.mark.parametrize("lead", [(0,), (0, 3)], ids=["2d", "3d"])
def test_masked_linear_empty_batch(path, lead):
    w, mask = torch.randn(6, 9), torch.rand(6, 9) < 0.4
    _check_against_oracle(saf.ops.masked_linear, F.linear, torch.randn(*lead, 9), w, mask,
                          torch.randn(6))


@pytest.mark.parametrize("stride", [1, 2])
def test_masked_conv2d_empty_batch(path, stride):
    """Stride 1 and 2 take different sparse input-gradient kernels."""
    w, mask = torch.randn(4, 3, 3, 3), torch.rand(4, 3, 3, 3) < 0.4

    def op(x, w, m, b):
        return saf.ops.masked_conv2d(x, w, m, b, stride=stride, padding=1)

    def oracle(x, w, b):
        return F.conv2d(x, w, b, stride=stride, padding=1)

    _check_against_oracle(op, oracle, torch.randn(0, 3, 7, 7), w, mask, torch.randn(4))


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])  # pgd_step has one cpp path
def test_pgd_step_empty_batch(backend, norm, monkeypatch):
    with forced_path(backend, monkeypatch):
        _pgd_step_empty_batch(norm)


def _pgd_step_empty_batch(norm: str) -> None:
    x = torch.rand(0, 3, 4, 4)
    grad = torch.randn(0, 3, 4, 4)
    y = saf.ops.pgd_step(x.clone(), grad, x, alpha=0.1, eps=0.3, norm=norm)
    assert y.shape == x.shape and y.dtype == x.dtype
    xa = x.clone()
    assert saf.ops.pgd_step_(xa, grad, x, alpha=0.1, eps=0.3, norm=norm) is xa
    x0 = saf.ops.random_start(x, eps=0.3, norm=norm)
    assert x0.shape == x.shape and x0.dtype == x.dtype


@pytest.mark.skipif("cpp" not in cpu_backends(), reason="the cpp backend needs a C++ compiler")
def test_masked_linear_layer_empty_batch_backward_on_csr_does_not_crash():
    """The reported repro, in a child process so that a native crash fails this test
    instead of killing the test run."""
    code = textwrap.dedent("""
        import torch
        import sparse_adv_fast as saf
        from sparse_adv_fast.backends import _cpp_ops
        _cpp_ops.LINEAR_SPARSE_DENSITY = 1.0
        layer = saf.nn.MaskedLinear(16, 8)
        layer.set_mask(torch.rand(8, 16) < 0.1)
        x = torch.randn(0, 16, requires_grad=True)
        with saf.backends.using("cpp"):
            layer(x).sum().backward()
        assert x.grad.shape == (0, 16) and torch.equal(layer.weight.grad, torch.zeros(8, 16))
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), (
        f"exit {run.returncode}\n{run.stdout}\n{run.stderr}")
