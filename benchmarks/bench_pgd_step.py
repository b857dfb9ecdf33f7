"""Fused ``pgd_step`` (cpp on CPU, cuda on GPU) against the eager torch composite.

The baseline of every group is the torch reference step (``x_adv + alpha*sign(g)``,
``torch.minimum(torch.maximum(...))``, ``clamp``; for L2 the per-sample norms and the
projection), i.e. what an eager PGD loop runs. On CUDA each entry also records the
achieved bandwidth (``GB/s``) over the bytes the fused kernel must move, and its fraction
of the card's peak (``of_peak``, from ``SAF_PEAK_GBPS`` or the device properties).

Run: ``python -m pytest benchmarks/bench_pgd_step.py --benchmark-only
--benchmark-json out.json`` then ``python benchmarks/report.py out.json``.
"""

from __future__ import annotations

import os

import pytest
import torch

from sparse_adv_fast import backends
from sparse_adv_fast.ops import op_module

REF = op_module("pgd_step")
SHAPE = (256, 3, 32, 32)
ALPHA = {"linf": 2 / 255, "l2": 0.1}
EPS = {"linf": 8 / 255, "l2": 0.5}
# elements moved per input element: L-inf reads x_adv, grad, x and writes out once; the
# two-pass L2 reads the three inputs for the norms, then again for the step.
PASSES = {"linf": 4, "l2": 7}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]
NATIVE = {"cpu": "cpp", "cuda": "cuda"}


def _impl(name: str, device: str):
    why = backends._reason(name, torch.device(device))
    if why is not None:
        pytest.skip(f"{name}: {why}")
    with backends.using(name):
        return REF._impl(torch.device(device))


def _peak_gbps() -> float | None:
    if os.environ.get("SAF_PEAK_GBPS"):
        return float(os.environ["SAF_PEAK_GBPS"])
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    return None


@pytest.mark.parametrize("impl", ["torch-eager", "native", "native-inplace"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("device", DEVICES)
def test_pgd_step(benchmark, device, norm, impl):
    x = torch.rand(SHAPE, device=device)
    x_adv = (x + EPS["linf"] * (torch.rand_like(x) * 2 - 1)).clamp(0, 1)
    g = torch.randn_like(x)
    out = torch.empty_like(x)
    args = (ALPHA[norm], EPS[norm], norm, 0.0, 1.0)
    name = impl
    if impl == "torch-eager":
        fn = lambda: REF.step(x_adv, g, x, *args, out)  # noqa: E731
    else:
        ext = _impl(NATIVE[device], device)
        name = impl.replace("native", NATIVE[device])
        if impl == "native":
            fn = lambda: ext.step(x_adv, g, x, *args, out)  # noqa: E731
        else:
            buf = x_adv.clone()  # repeated in-place steps stay in the ball: same traffic
            fn = lambda: ext.step(buf, g, x, *args, buf)  # noqa: E731

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        r = fn()
        sync()
        return r

    benchmark.group = f"pgd_step fused vs eager {norm} {'x'.join(map(str, SHAPE))} {device}"
    benchmark.extra_info["impl"] = name
    if impl == "torch-eager":
        benchmark.extra_info["baseline"] = True
    rounds, warmup = (50, 5) if device == "cuda" else (15, 3)
    sync()
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if device == "cuda":
        nbytes = PASSES[norm] * x.numel() * x.element_size()
        gbps = nbytes / benchmark.stats.stats.median / 1e9
        benchmark.extra_info["GB/s"] = round(gbps, 1)
        peak = _peak_gbps()
        if peak:
            benchmark.extra_info["of_peak"] = round(gbps / peak, 3)
