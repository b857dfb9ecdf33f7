"""GPU benchmarks of the Triton kernels (skipped without CUDA).

* masked linear forward + backward vs cuBLAS dense (``F.linear`` on the plain weight);
* the attack path (forward + grad_input only, weights frozen) at >= 90% sparsity, for
  linear and conv layers, including both Triton conv paths (implicit GEMM and masked
  weight + cuDNN: this group is the measurement that picks ``kernels.masked_conv2d``'s
  default ``CONV_PATH``);
* pgd_step: achieved bandwidth as a fraction of the card's peak (``extra_info``), against
  the eager torch step.

Run: ``python -m pytest benchmarks/bench_triton.py --benchmark-only
--benchmark-json out.json`` then ``python benchmarks/report.py out.json``.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROUNDS, WARMUP = 20, 3  # warm-up also runs the autotuner once per shape


def _kern(op: str):
    return importlib.import_module(f"sparse_adv_fast.kernels.{op}")


def _ref(op: str):
    from sparse_adv_fast.ops import op_module

    return op_module(op)


def _run(benchmark, fn, group: str, impl: str, baseline: bool = False, **info):
    def timed():
        out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    if baseline:
        benchmark.extra_info["baseline"] = True
    benchmark.extra_info.update(info)
    torch.cuda.synchronize()
    return benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


def _mask(shape, density: float) -> torch.Tensor:
    return torch.rand(shape, device="cuda") < density


# ---- masked linear: forward + backward vs cuBLAS dense -----------------------------------
LINEAR = [(256, 4096, 4096), (4096, 1024, 1024)]  # (M, K, N)
DTYPES = [torch.float32, torch.bfloat16]


def _linear_fwd_bwd(impl: str, x, w, m, gy):
    lin = _kern("masked_linear")
    if impl == "cublas-dense":
        def fn():
            xx = x.detach().requires_grad_()
            ww = w.detach().requires_grad_()
            F.linear(xx, ww).backward(gy)
    elif impl == "torch-masked":
        ref = _ref("masked_linear")

        def fn():
            ref.forward(x, w, m, None)
            ref.grad_input(gy, w, m)
            ref.grad_weight(gy, x, m)
    else:
        def fn():
            lin.forward(x, w, m, None)
            lin.grad_input(gy, w, m)
            lin.grad_weight(gy, x, m)
    return fn


@pytest.mark.parametrize("impl", ["cublas-dense", "torch-masked", "triton"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR, ids=lambda s: "x".join(map(str, s)))
def test_masked_linear_fwd_bwd(benchmark, shape, dtype, density, impl):
    M, K, N = shape
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = torch.randn(N, K, device="cuda", dtype=dtype)
    gy = torch.randn(M, N, device="cuda", dtype=dtype)
    m = _mask(w.shape, density)
    _run(benchmark, _linear_fwd_bwd(impl, x, w, m, gy),
         f"linear fwd+bwd M{M} K{K} N{N} {dtype} d={density}", impl,
         baseline=impl == "cublas-dense")


# ---- attack path (forward + grad_input, frozen weights) at >= 90% sparsity ---------------
@pytest.mark.parametrize("impl", ["cublas-dense", "triton"])
@pytest.mark.parametrize("density", [0.1, 0.05])
def test_attack_path_linear(benchmark, density, impl):
    lin = _kern("masked_linear")
    x = torch.randn(128, 3072, device="cuda")
    w = torch.randn(1024, 3072, device="cuda")
    gy = torch.randn(128, 1024, device="cuda")
    m = _mask(w.shape, density)
    wm = w * m
    if impl == "cublas-dense":
        def fn():
            F.linear(x, wm)
            return gy @ wm
    else:
        def fn():
            lin.forward(x, w, m, None)
            return lin.grad_input(gy, w, m)
    _run(benchmark, fn, f"attack linear 128x3072->1024 d={density}", impl,
         baseline=impl == "cublas-dense")


CONV = [  # (N, Cin, H, Cout): VGG/ResNet CIFAR 3x3 layers
    (128, 64, 32, 64),
    (128, 256, 8, 256),
    (128, 512, 4, 512),
]


@pytest.mark.parametrize("impl", ["cudnn-dense", "triton-igemm", "triton-cudnn"])
@pytest.mark.parametrize("density", [1.0, 0.1])
@pytest.mark.parametrize("shape", CONV, ids=lambda s: "x".join(map(str, s)))
def test_attack_path_conv(benchmark, monkeypatch, shape, density, impl):
    conv_k = _kern("masked_conv2d")
    n, cin, h, cout = shape
    x = torch.randn(n, cin, h, h, device="cuda")
    w = torch.randn(cout, cin, 3, 3, device="cuda")
    m = _mask(w.shape, density)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    gy = torch.randn(n, cout, h, h, device="cuda")
    if impl == "cudnn-dense":
        wm = w * m

        def fn():
            F.conv2d(x, wm, None, 1, 1)
            return torch.ops.aten.convolution_backward(
                gy, x, wm, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]
            )[0]
    else:
        monkeypatch.setattr(conv_k, "CONV_PATH", impl.split("-")[1])

        def fn():
            conv_k.forward(x, w, m, None, conv)
            return conv_k.grad_input(gy, x, w, m, conv)
    _run(benchmark, fn, f"attack conv3x3 N{n} C{cin} {h}x{h} ->{cout} d={density}", impl,
         baseline=impl == "cudnn-dense")


@pytest.mark.parametrize("impl", ["cudnn-dense", "triton-igemm", "triton-cudnn"])
@pytest.mark.parametrize("shape", CONV, ids=lambda s: "x".join(map(str, s)))
def test_conv_grad_weight(benchmark, monkeypatch, shape, impl):
    conv_k = _kern("masked_conv2d")
    n, cin, h, cout = shape
    x = torch.randn(n, cin, h, h, device="cuda")
    m = _mask((cout, cin, 3, 3), 0.1)
    gy = torch.randn(n, cout, h, h, device="cuda")
    conv = ([1, 1], [1, 1], [1, 1], 1)
    if impl == "cudnn-dense":
        w_like = x.new_empty(m.shape)

        def fn():
            return torch.ops.aten.convolution_backward(
                gy, x, w_like, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                [False, True, False],
            )[1]
    else:
        monkeypatch.setattr(conv_k, "CONV_PATH", impl.split("-")[1])

        def fn():
            return conv_k.grad_weight(gy, x, m, conv)
    _run(benchmark, fn, f"conv grad_weight N{n} C{cin} {h}x{h} ->{cout} d=0.1", impl,
         baseline=impl == "cudnn-dense")


# ---- pgd_step: achieved bandwidth ---------------------------------------------------------
_PEAK_GBPS_BY_NAME = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 1555.0}


def _peak_gbps() -> float | None:
    """The card's DRAM bandwidth in GB/s: ``SAF_PEAK_GBPS``, the device properties, or a
    table of known cards; None when unknown."""
    if os.environ.get("SAF_PEAK_GBPS"):
        return float(os.environ["SAF_PEAK_GBPS"])
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    for key, gbps in _PEAK_GBPS_BY_NAME.items():
        if key in props.name:
            return gbps
    return None


PGD = [(256, 3, 32, 32), (64, 3, 224, 224)]


@pytest.mark.parametrize("impl", ["torch-eager", "triton", "triton-inplace"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", PGD, ids=lambda s: "x".join(map(str, s)))
def test_pgd_step_bandwidth(benchmark, shape, norm, impl):
    k = _kern("pgd_step")
    ref = _ref("pgd_step")
    x = torch.rand(shape, device="cuda")
    xa = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
    g = torch.randn_like(x)
    out = torch.empty_like(x)
    args = (2 / 255, 8 / 255, norm, 0.0, 1.0)
    if impl == "torch-eager":
        fn = lambda: ref.step(xa, g, x, *args, out)
    elif impl == "triton":
        fn = lambda: k.step(xa, g, x, *args, out)
    else:
        buf = xa.clone()  # stays in the ball: repeated in-place steps keep the traffic equal
        fn = lambda: k.step(buf, g, x, *args, buf)
    # minimum traffic: read x_adv, grad, x and write out (L2 reads x_adv, grad, x twice more)
    passes = 4 if norm == "linf" else 4 + 1 + 3
    nbytes = passes * x.numel() * x.element_size()
    _run(benchmark, fn, f"pgd_step {norm} {'x'.join(map(str, shape))}", impl,
         baseline=impl == "torch-eager")
    median = benchmark.stats.stats.median
    gbps = nbytes / median / 1e9
    benchmark.extra_info["GB/s"] = round(gbps, 1)
    peak = _peak_gbps()
    if peak:
        benchmark.extra_info["of_peak"] = round(gbps / peak, 3)
