"""masked_linear / masked_conv2d: every backend against the pure-torch reference.

The cpp backend is run on both of its paths (dense BLAS on the cached masked weight, and
the sparse CSR kernels) by moving its density threshold, so every density exercises both.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends, requires_cuda
from tolerances import assert_close

from sparse_adv_fast import backends
from sparse_adv_fast.backends import _cpp_ops
from sparse_adv_fast.ops import _cache, masked_conv2d, masked_linear, op_module

ml_mod = op_module("masked_linear")
mc_mod = op_module("masked_conv2d")

DENSITIES = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)

# (backend, cpp path): the cpp backend twice, once per path; cuda only where present.
_CASES = []
for _b in cpu_backends():
    if _b == "cpp":
        _CASES += [pytest.param("cpp", "dense", id="cpp-dense"),
                   pytest.param("cpp", "sparse", id="cpp-sparse")]
    else:
        _CASES.append(pytest.param(_b, None, id=_b))
_CASES.append(pytest.param("cuda", None, id="cuda", marks=requires_cuda))

# The Triton interpreter is slow and Triton is tested in depth elsewhere: fewer densities.
_GRID = [
    pytest.param(*c.values, d, id=f"{c.id}-{d}", marks=c.marks)
    for c in _CASES
    for d in DENSITIES
    if c.values[0] != "triton" or d in (0.0, 0.5, 1.0)
]


_THRESHOLDS = ("LINEAR_SPARSE_DENSITY", "CONV_SPARSE_DENSITY", "CONV_GRAD_WEIGHT_SPARSE_DENSITY")


def _force_threshold(monkeypatch, value: float) -> None:
    for name in _THRESHOLDS:
        monkeypatch.setattr(_cpp_ops, name, value)


@pytest.fixture
def path(request, monkeypatch):
    """Force the cpp backend's path by moving its density thresholds."""
    mode = request.param if hasattr(request, "param") else None
    if mode == "sparse":
        _force_threshold(monkeypatch, 1.0)
    elif mode == "dense":
        _force_threshold(monkeypatch, -1.0)
    return mode


def _device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" else "cpu")


def _mask(shape, density: float, device) -> torch.Tensor:
    return torch.rand(shape, device=device) < density


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """Same values as ``t`` in a non-contiguous layout (every other column of a wider one)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _check_triton_op(backend: str, op: str) -> None:
    """Triton kernels are another engineer's; skip only if their module does not exist yet."""
    if backend == "triton":
        try:
            backends.triton.loader(op)
        except ModuleNotFoundError as e:  # pragma: no cover - depends on the checkout
            pytest.skip(f"triton kernels for {op} not present: {e}")


def _compare_grads(y, y_ref, tensors, refs, mask, gy):
    assert_close(y, y_ref, msg="output")
    y.backward(gy)
    y_ref.backward(gy)
    for name, t, r in zip(("x", "w", "b"), tensors, refs, strict=True):
        if t is None:
            continue
        assert_close(t.grad, r.grad, msg=f"grad_{name}")
    gw = tensors[1].grad
    assert (gw[~mask] == 0).all(), "grad_w must be exactly zero at pruned positions"


LIN_SHAPES = [((1,), 7, 5), ((4,), 33, 17), ((2, 3), 16, 9)]


@pytest.mark.parametrize(("backend", "path", "density"), _GRID, indirect=["path"])
def test_masked_linear_matches_reference(backend, path, density):
    _check_triton_op(backend, "masked_linear")
    dev = _device(backend)
    shapes = LIN_SHAPES[:1] if backend == "triton" else LIN_SHAPES
    for i, (lead, k, n) in enumerate(shapes):
        x = torch.randn(*lead, k, device=dev)
        if i == 1:
            x = _noncontig(x)
        w = torch.randn(n, k, device=dev)
        mask = _mask(w.shape, density, dev)
        b = torch.randn(n, device=dev) if i != 2 else None
        xs, ws = _leaf(x), _leaf(w)
        bs = _leaf(b) if b is not None else None
        xr, wr = _leaf(x), _leaf(w)
        br = _leaf(b) if b is not None else None
        with backends.using(backend):
            y = masked_linear(xs, ws, mask, bs)
            gy = torch.randn_like(y)
            y_ref = ml_mod.reference(xr, wr, mask, br)
            _compare_grads(y, y_ref, (xs, ws, bs), (xr, wr, br), mask, gy)


# (N, C, H, W, OC, kernel, stride, padding, dilation, groups)
CONV_SHAPES = [
    (1, 3, 7, 6, 4, 3, 1, 1, 1, 1),
    (2, 4, 9, 8, 6, (3, 2), (2, 1), (0, 2), (1, 2), 2),
    (2, 6, 5, 7, 3, 1, 1, 0, 1, 3),
    (3, 2, 8, 8, 4, 3, 2, 1, 2, 1),
]


@pytest.mark.parametrize(("backend", "path", "density"), _GRID, indirect=["path"])
def test_masked_conv2d_matches_reference(backend, path, density):
    _check_triton_op(backend, "masked_conv2d")
    dev = _device(backend)
    shapes = CONV_SHAPES[:1] if backend == "triton" else CONV_SHAPES
    for i, (n, c, h, wd, oc, k, s, p, d, g) in enumerate(shapes):
        kh, kw = (k, k) if isinstance(k, int) else k
        x = torch.randn(n, c, h, wd, device=dev)
        if i == 1:
            x = x.to(memory_format=torch.channels_last)
        elif i == 3:
            x = _noncontig(x)
        w = torch.randn(oc, c // g, kh, kw, device=dev)
        mask = _mask(w.shape, density, dev)
        b = torch.randn(oc, device=dev) if i != 2 else None
        xs, ws, xr, wr = _leaf(x), _leaf(w), _leaf(x), _leaf(w)
        bs = _leaf(b) if b is not None else None
        br = _leaf(b) if b is not None else None
        with backends.using(backend):
            y = masked_conv2d(xs, ws, mask, bs, s, p, d, g)
            gy = torch.randn_like(y)
            y_ref = mc_mod.reference(xr, wr, mask, br, s, p, d, g)
            _compare_grads(y, y_ref, (xs, ws, bs), (xr, wr, br), mask, gy)


class _Spy:
    """Records which backend functions an op calls."""

    def __init__(self, impl):
        self.impl, self.calls = impl, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.impl, name)


@pytest.mark.parametrize(("backend", "path"), _CASES, indirect=["path"])
def test_attack_backward_computes_no_weight_grad(backend, path, monkeypatch):
    _check_triton_op(backend, "masked_linear")
    _check_triton_op(backend, "masked_conv2d")
    dev = _device(backend)
    for mod, make in (
        (ml_mod, lambda: (torch.randn(3, 8, device=dev), torch.randn(5, 8, device=dev), ())),
        (mc_mod, lambda: (torch.randn(1, 2, 5, 5, device=dev),
                          torch.randn(3, 2, 3, 3, device=dev), (1, 1))),
    ):
        spies = []
        orig = mod._impl

        def spy_impl(device, orig=orig, spies=spies):
            spies.append(_Spy(orig(device)))
            return spies[-1]

        monkeypatch.setattr(mod, "_impl", spy_impl)
        x, w, extra = make()
        mask = _mask(w.shape, 0.3, dev)
        x.requires_grad_(True)
        fn = masked_linear if mod is ml_mod else masked_conv2d
        with backends.using(backend):
            fn(x, w, mask, None, *extra).sum().backward()
        called = [c for s in spies for c in s.calls]
        assert "grad_input" in called and "grad_weight" not in called, called
        assert x.grad is not None and w.grad is None


@pytest.mark.parametrize("backend", ["cpp" if "cpp" in cpu_backends() else "torch"])
def test_opcheck_custom_ops(backend, monkeypatch):
    # Sparse path: the dense one is torch's own kernels; opcheck the native code.
    _force_threshold(monkeypatch, 1.0)
    x, w = torch.randn(3, 6), torch.randn(4, 6)
    mask, b = torch.rand(4, 6) < 0.5, torch.randn(4)
    xc, wc = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3)
    maskc, bc = torch.rand(6, 2, 3, 3) < 0.5, torch.randn(6)
    conv = ([1, 2], [1, 0], [1, 1], 2)
    gyc = torch.randn(2, 6, 6, 2)
    with backends.using(backend):
        for op, args in (
            (torch.ops.saf.masked_linear, (x.requires_grad_(), w.requires_grad_(), mask, b)),
            (torch.ops.saf.masked_linear_grad_input, (torch.randn(3, 4), w.detach(), mask)),
            (torch.ops.saf.masked_linear_grad_weight, (torch.randn(3, 4), x.detach(), mask)),
            (torch.ops.saf.masked_conv2d, (xc, wc, maskc, bc, *conv)),
            (torch.ops.saf.masked_conv2d_grad_input, (gyc, xc, wc, maskc, *conv)),
            (torch.ops.saf.masked_conv2d_grad_weight, (gyc, xc, maskc, *conv)),
        ):
            torch.library.opcheck(op, args)


@pytest.mark.skipif("cpp" not in cpu_backends(), reason="needs a C++ compiler")
def test_csr_cache_built_once_per_weight_version(monkeypatch):
    monkeypatch.setattr(_cpp_ops, "LINEAR_SPARSE_DENSITY", 0.5)
    w, x = torch.randn(16, 12), torch.randn(4, 12)
    mask = _mask(w.shape, 0.2, "cpu")
    with backends.using("cpp"), _cache.frozen([w]):  # forms are reused within a scope only
        y1 = masked_linear(x, w, mask)
        first = _cpp_ops.csr(w, mask)
        masked_linear(x, w, mask)
        assert _cpp_ops.csr(w, mask) is first, "CSR must be reused while the weight is unchanged"
        rowptr, col, val = first
        assert int(rowptr[-1]) == int(mask.sum()) == val.numel()
        with torch.no_grad():
            w.mul_(2.0)  # an optimizer-style in-place update bumps w._version
        y2 = masked_linear(x, w, mask)
        rebuilt = _cpp_ops.csr(w, mask)
        assert rebuilt is not first, "an in-place update must invalidate the CSR"
        assert_close(rebuilt[2], 2.0 * val)
        assert_close(y2, 2.0 * y1)
        _cache.stats.reset()
        masked_linear(x, w, mask)
        assert _cache.stats.builds == 0


@pytest.mark.skipif("cpp" not in cpu_backends(), reason="needs a C++ compiler")
def test_cpp_chooses_path_by_density(monkeypatch):
    calls = []
    impl = backends.cpp.loader("masked_linear")
    monkeypatch.setattr(impl, "_ext", _Recorder(impl._ext, calls))
    w, x = torch.randn(64, 64), torch.randn(2, 64)
    with backends.using("cpp"):
        masked_linear(x, w, _mask(w.shape, 0.9, "cpu"))
        assert calls == []
        masked_linear(x, w, _mask(w.shape, _cpp_ops.LINEAR_SPARSE_DENSITY / 4, "cpu"))
        assert calls == ["spmm"]


def _held_bytes() -> int:
    """Bytes of every tensor the op cache holds, a tensor shared by two forms counted once."""
    seen: dict[int, int] = {}
    for e in list(_cache._entries.values()):
        for form in e.forms.values():
            for t in form if isinstance(form, (tuple, list)) else (form,):
                if isinstance(t, torch.Tensor):
                    seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@pytest.mark.skipif("cpp" not in cpu_backends(), reason="needs a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_linear_holds_one_compact_csr(dtype, monkeypatch):
    """A train step on the sparse path caches one CSR: int16 columns + values + row offsets
    (counted here from the mask), and no transposed copy for the input gradient."""
    monkeypatch.setattr(_cpp_ops, "LINEAR_SPARSE_DENSITY", 1.0)
    out, inp = 48, 40
    w = torch.randn(out, inp, dtype=dtype, requires_grad=True)
    x = torch.randn(5, inp, dtype=dtype, requires_grad=True)
    mask = _mask(w.shape, 0.2, "cpu")
    nnz = sum(int(v) for row in mask.tolist() for v in row)
    _cache.clear()
    with backends.using("cpp"):
        masked_linear(x, w, mask).sum().backward()
    forms = [k for e in _cache._entries.values() for k in e.forms]
    assert not any(k.startswith("csr_t") for k in forms), forms
    itemsize = torch.finfo(dtype).bits // 8
    assert _held_bytes() <= nnz * (2 + itemsize) + (out + 1) * 8
    _cache.clear()


@pytest.mark.skipif("cpp" not in cpu_backends(), reason="needs a C++ compiler")
@pytest.mark.parametrize("index", [torch.int16, torch.int32])
@pytest.mark.parametrize("batch", [1, 3, 37, 70])
def test_linear_kernels_take_either_index_width(index, batch):
    """spmm / spmm_t (scatter through the forward CSR) / sddmm against dense torch, for both
    column widths (int32 is what rows longer than int16 can index get)."""
    ext = backends.cpp.loader("masked_linear")._ext
    w, mask = torch.randn(33, 45, dtype=torch.float64), _mask((33, 45), 0.3, "cpu")
    x, gy = torch.randn(batch, 45, dtype=torch.float64), torch.randn(batch, 33, dtype=torch.float64)
    rowptr, col, val = _cpp_ops.csr(w, mask, index)
    assert col.dtype == index
    wm = torch.where(mask, w, torch.zeros_like(w))
    assert_close(ext.spmm(x, rowptr, col, val, 33, None), x @ wm.t())
    assert_close(ext.spmm_t(gy, rowptr, col, val, 45), gy @ wm)
    gw = ext.sddmm(gy, x, rowptr, col)
    assert_close(gw, torch.where(mask, gy.t() @ x, torch.zeros_like(gw)))
    assert bool((gw[~mask] == 0).all())
    assert _cpp_ops.index_dtype(32768) == torch.int16 and _cpp_ops.index_dtype(32769) == torch.int32


@pytest.mark.skipif("cpp" not in cpu_backends(), reason="needs a C++ compiler")
@pytest.mark.parametrize("index", [torch.int16, torch.int32])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_kernels_take_either_index_width(index, stride):
    """The conv sparse kernels agree with torch's convolution for both column widths."""
    ext = backends.cpp.loader("masked_conv2d")._ext
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    mask = _mask(w.shape, 0.4, "cpu")
    conv = ([stride, stride], [1, 1], [1, 1], 2)
    wm = torch.where(mask, w, torch.zeros_like(w))
    rowptr, col, val = _cpp_ops.csr(w, mask, index)
    y = ext.conv_forward(x, rowptr, col, val, list(w.shape), None, *conv)
    assert_close(y, F.conv2d(x, wm, None, stride, 1, 1, 2))
    gy = torch.randn_like(y)
    xr, wr = x.clone().requires_grad_(), wm.clone().requires_grad_()
    F.conv2d(xr, wr, None, stride, 1, 1, 2).backward(gy)
    rt, ct, vt = _cpp_ops.csr_t(w, mask, 2, index=index)
    assert ct.dtype == index
    gx = ext.conv_grad_input(gy, list(x.shape), rt, ct, vt, list(w.shape), *conv)
    assert_close(gx, xr.grad)
    rp, cp = _cpp_ops.pattern(mask, index)
    gw = ext.conv_grad_weight(gy, x, rp, cp, list(w.shape), *conv)
    assert_close(gw, torch.where(mask, wr.grad, torch.zeros_like(gw)))
    assert bool((gw[~mask] == 0).all())


class _Recorder:
    def __init__(self, ext, calls):
        self.ext, self.calls = ext, calls

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.ext, name)


def test_bad_input_is_rejected_before_dispatch():
    w = torch.randn(4, 6)
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        masked_linear(torch.randn(2, 6), w, torch.ones(4, 6))
    with pytest.raises(ValueError, match="features/channels"):
        masked_linear(torch.randn(2, 5), w, torch.ones(4, 6, dtype=torch.bool))
