"""Batch-norm folding inside gradient attacks: the folded model computes what the model
computes (oracle: the model itself, eval mode), only eligible pairs are folded, and the
attack on the folded model finds the same adversarial points as on the unfolded one."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import sparse_adv_fast as saf
from sparse_adv_fast.attacks import _fold, _hygiene


def _trained_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every batch norm."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def _resnet(sparse: bool) -> nn.Module:
    torch.manual_seed(0)
    model = _trained_bn(saf.models.resnet18(num_classes=10, width=0.125))
    if sparse:
        saf.sparsify(model)
        saf.prune.magnitude(model, 0.8, scope="layer")
    return model.double()


def _folds(model: nn.Module) -> tuple[nn.Module, int]:
    with _hygiene.attack_mode(model), _fold.folded(model) as fm:
        n = sum(isinstance(m, _fold._FoldedConv) for m in fm.modules())
        return fm, n


@pytest.mark.parametrize("sparse", [False, True])
def test_folded_resnet_matches_the_model_in_value_and_input_gradient(sparse):
    model = _resnet(sparse)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with _hygiene.attack_mode(model):
        xr = x.clone().requires_grad_()
        ref = model(xr)
        (gref,) = torch.autograd.grad(ref.square().sum(), xr)
        with _fold.folded(model) as fm:
            assert fm is not model
            folds = [m for m in fm.modules() if isinstance(m, _fold._FoldedConv)]
            assert len(folds) == n_bn  # every conv -> bn pair of a ResNet
            assert not any(isinstance(m, nn.BatchNorm2d) for m in fm.modules()
                           if m not in model.modules())
            xf = x.clone().requires_grad_()
            out = fm(xf)
            (g,) = torch.autograd.grad(out.square().sum(), xf)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, gref, rtol=1e-10, atol=1e-10)
    assert all(f.weight is None for f in folds)  # released at exit


class _Shared(nn.Module):
    """conv -> bn, but the conv output is also added back: folding would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        y = self.conv(x)
        return self.head((self.bn(y) + y).flatten(1))


class _Reflect(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
        self.bn, self.head = nn.BatchNorm2d(3), nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).flatten(1))


@pytest.mark.parametrize("make", [_Shared, _Reflect], ids=["shared-output", "reflect-pad"])
def test_ineligible_pairs_are_not_folded(make):
    model = _trained_bn(make())
    _, n = _folds(model)
    assert n == 0


def test_hooks_and_training_mode_batch_norms_are_respected():
    model = _trained_bn(_Reflect())
    model.conv.padding_mode = "zeros"
    assert _folds(model)[1] == 1
    handle = model.bn.register_forward_hook(lambda *a: None)
    assert _folds(model)[1] == 0  # a hook on the batch norm: it must still run
    handle.remove()
    assert _folds(model)[1] == 1
    with _fold.folded(model) as fm:  # outside attack_mode: training-mode bn, nothing folds
        assert fm is model


def test_untraceable_model_runs_unfolded():
    class Branchy(_Reflect):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = x * 1.0
            return super().forward(x)

    model = _trained_bn(Branchy())
    model.conv.padding_mode = "zeros"
    fm, n = _folds(model)
    assert fm is model and n == 0


def test_pgd_on_a_folded_model_finds_the_unfolded_points(monkeypatch):
    """PGD with folding against PGD with folding switched off, same start: the same
    adversarial points (float64, so rounding cannot flip a gradient sign)."""
    model = _resnet(sparse=True)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    torch.manual_seed(3)
    folded = saf.attacks.pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=5)
    monkeypatch.setattr(_fold._Plan, "__init__", _no_fold)
    _fold._PLANS.clear()
    torch.manual_seed(3)
    plain = saf.attacks.pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=5)
    torch.testing.assert_close(folded, plain, rtol=0, atol=1e-12)


def _no_fold(self, model):
    self.signature, self.module, self.folds = _fold._signature(model), None, []


class _ConvReLU(nn.Module):
    """Masked conv -> ReLU twice (module and in-place functional forms), no batch norm;
    ``shared`` also adds the second conv's output back, so that ReLU cannot be fused."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6 * 8 * 8, 4)
        self.shared = shared

    def forward(self, x):
        y = self.c2(self.act(self.c1(x)))
        z = torch.nn.functional.relu(y, inplace=True) if not self.shared else torch.relu(y) + y
        return self.head(z.flatten(1))


def _sparse_conv_relu(shared: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = saf.sparsify(_ConvReLU(shared))
    saf.prune.magnitude(model, 0.6, scope="layer")
    return model.double()


def _model_then_folded(model: nn.Module, x: torch.Tensor, *scopes, each=None):
    """Inside ``scopes`` and attack mode: the model's value and input gradient, then the
    folded model's, run twice (the first call of a shape chooses; the second skips the
    op), with ``each()`` before each run. Returns (ref, gref, out, g, folded module)."""
    with contextlib.ExitStack() as stack:
        for s in scopes:
            stack.enter_context(s)
        stack.enter_context(_hygiene.attack_mode(model))
        xr = x.clone().requires_grad_()
        ref = model(xr)
        (gref,) = torch.autograd.grad(ref.square().sum(), xr)
        for _ in range(2):
            if each is not None:
                each()
            with _fold.folded(model) as fm:
                xf = x.clone().requires_grad_()
                out = fm(xf)
                (g,) = torch.autograd.grad(out.square().sum(), xf)
    return ref, gref, out, g, fm


@pytest.mark.parametrize("backend", ["auto", "cpp", "torch"])
def test_relu_after_a_masked_conv_is_fused_and_exact(monkeypatch, tmp_path, backend):
    """On the sparse kernels (``auto`` with a timer that makes them win, or ``cpp`` on its
    sparse path) the ReLU runs inside them: the fused functions are called. On the torch
    backend the same plan falls back to conv then ReLU. All compute what the model
    computes, value and input gradient."""
    from sparse_adv_fast.backends import _autotune, _cpp, _cpp_ops

    ran: list[str] = []
    if backend != "torch":
        from conftest import cpu_backends

        if "cpp" not in cpu_backends():
            pytest.skip("needs a C++ compiler")
        monkeypatch.setattr(_cpp_ops, "CONV_SPARSE_DENSITY", 1.0)
        cls = _cpp_ops.Conv2dOps if backend == "cpp" else _cpp.SparseConv2d
        real = cls.grad_input_relu
        monkeypatch.setattr(cls, "grad_input_relu",
                            lambda self, *a: ran.append(backend) or real(self, *a))
    monkeypatch.setenv(_autotune.ENV_CACHE, str(tmp_path / "dispatch.json"))
    saf.backends.reset()
    sparse_wins = _autotune.use_timer(
        lambda key, fns: {n: (1.0 if n == "cpp-sparse" else 2.0) for n in fns})
    model = _sparse_conv_relu()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    try:
        ref, gref, out, g, fm = _model_then_folded(model, x, saf.backends.using(backend),
                                                   sparse_wins)
    finally:
        saf.backends.reset()  # no choice made under the fake timer outlives the test
    folds = [m for m in fm.modules() if isinstance(m, _fold._FoldedConv)]
    assert len(folds) == 2 and all(f.relu for f in folds)
    assert not any(isinstance(m, nn.ReLU) for m in fm.modules() if m not in model.modules())
    assert ran if backend != "torch" else not ran  # the fused input gradient ran
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, gref, rtol=1e-10, atol=1e-10)


def test_relu_backward_fuses_when_only_the_input_gradient_is_on_the_sparse_kernels(
        monkeypatch, tmp_path):
    """Forward picked on torch, input gradient on the direct kernels (an RGB stem's usual
    pair): the ReLU's forward runs on torch's output and its backward inside the gated
    kernel; value and input gradient are the model's."""
    from conftest import cpu_backends

    from sparse_adv_fast.backends import _autotune, _cpp

    if "cpp" not in cpu_backends():
        pytest.skip("needs a C++ compiler")
    ran: list[str] = []
    for direction in ("forward_relu", "grad_input_relu", "grad_input"):
        real = getattr(_cpp.SparseConv2d, direction)
        monkeypatch.setattr(_cpp.SparseConv2d, direction,
                            lambda self, *a, real=real, d=direction: ran.append(d)
                            or real(self, *a))
    monkeypatch.setenv(_autotune.ENV_CACHE, str(tmp_path / "dispatch.json"))
    saf.backends.reset()
    split = _autotune.use_timer(lambda key, fns: {
        n: (1.0 if (n == "cpp-sparse") == (key.direction == "grad_input") else 2.0)
        for n in fns})
    model = _sparse_conv_relu()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    try:
        ref, gref, out, g, _ = _model_then_folded(model, x, split, each=ran.clear)
    finally:
        saf.backends.reset()
    assert ran == ["grad_input_relu", "grad_input_relu"]  # both convs, gated; no forward
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, gref, rtol=1e-10, atol=1e-10)


def test_relu_is_not_fused_where_the_conv_output_has_other_users_or_hooks():
    model = _sparse_conv_relu(shared=True)
    _, n = _folds(model)
    assert n == 1  # c1 -> act only: c2's output is also added back
    handle = model.act.register_forward_hook(lambda *a: None)
    assert _folds(model)[1] == 0  # a hooked ReLU must still run
    handle.remove()
    dense = _ConvReLU()  # plain convs: nothing to fuse, the forward is not traced
    assert _folds(dense)[1] == 0


@pytest.mark.parametrize("cfg", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=1, padding=1, dilation=2),
    dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 1), ceil_mode=True),
])
def test_fast_max_pool_is_the_module_exactly(cfg):
    """Same values and the same input gradient, bit for bit, on ReLU'd inputs rounded so
    that windows hold ties (and zeros), with a NaN: the window kernels (the 2x2 case) and
    the channels_last path (the others) pick the element aten picks."""
    pool = nn.MaxPool2d(**cfg)
    fast = _fold._MaxPool(pool)
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(3, 5, 9, 11, generator=g)).round(decimals=1)
    x[0, 1, 2, 3] = float("nan")
    outs = []
    for m in (pool, fast):
        xr = x.clone().requires_grad_()
        y = m(xr)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        y.backward(gy)
        outs.append((y.detach(), xr.grad))
    assert torch.equal(outs[0][0].isnan(), outs[1][0].isnan())
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0, atol=0)


def test_folded_cnn_takes_the_fast_pool_and_matches_the_model():
    torch.manual_seed(0)
    model = saf.sparsify(saf.models.small_cnn(in_channels=3, image_size=16))
    saf.prune.magnitude(model, 0.8, scope="layer")
    model = model.double()
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    with _hygiene.attack_mode(model):
        xr = x.clone().requires_grad_()
        ref = model(xr)
        (gref,) = torch.autograd.grad(ref.square().sum(), xr)
        with _fold.folded(model) as fm:
            assert sum(isinstance(m, _fold._MaxPool) for m in fm.modules()) == 1
            xf = x.clone().requires_grad_()
            out = fm(xf)
            (g,) = torch.autograd.grad(out.square().sum(), xf)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, gref, rtol=1e-12, atol=1e-12)


def test_plain_convs_stay_dense_and_residual_sums_run_in_place(monkeypatch, tmp_path):
    """A dense ResNet's plain convs run through the masked op with an all-kept mask, and
    even a timer that makes the CSR kernels win leaves all but the thin RGB stem on torch
    (near-dense weights are outside the CSR kernels' range: mis-timed on a loaded machine,
    they slowed a dense ResNet-18 PGD-10 2.6x; a 3-channel stem is inside it). The folded
    model computes the model's value and input gradient; each block's residual sum goes
    into its conv's output, and the ReLU after it runs in place."""
    from conftest import cpu_backends

    from sparse_adv_fast.backends import _autotune, _cpp

    if "cpp" not in cpu_backends():
        pytest.skip("needs a C++ compiler")
    ran: list[tuple] = []  # the mask shapes the CSR kernels ran on
    for direction in ("forward", "grad_input", "forward_relu", "grad_input_relu"):
        real = getattr(_cpp.SparseConv2d, direction)
        at = {"forward": 2, "forward_relu": 2, "grad_input": 3, "grad_input_relu": 4}[direction]
        monkeypatch.setattr(_cpp.SparseConv2d, direction,
                            lambda self, *a, real=real, at=at:
                            ran.append(tuple(a[at].shape)) or real(self, *a))
    monkeypatch.setenv(_autotune.ENV_CACHE, str(tmp_path / "dispatch.json"))
    saf.backends.reset()
    model = _resnet(sparse=False)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    csr_wins = _autotune.use_timer(
        lambda key, fns: {n: (1.0 if n == "cpp-sparse" else 3.0) for n in fns})
    try:
        ref, gref, out, g, fm = _model_then_folded(model, x, csr_wins)
    finally:
        saf.backends.reset()
    assert not any(isinstance(m, saf.nn.MaskedConv2d) for m in model.modules())
    stem = tuple(model.stem[0].weight.shape)
    assert stem[1:] == (3, 3, 3) and stem in ran  # thin: timed, and it won
    assert set(ran) == {stem}  # density 1 elsewhere: the CSR kernels are not candidates
    targets = [n.target for n in fm.graph.nodes if n.op == "call_function"]
    assert targets.count(_fold._add_into) == 8 and targets.count(torch.relu_) == 8
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, gref, rtol=1e-10, atol=1e-10)


def test_residual_sum_goes_in_place_only_where_the_result_fits_the_conv_output():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(1, 3, 1, 1)
    want = a + b
    into = a.clone()
    out = _fold._add_into(into, b)
    assert out.data_ptr() == into.data_ptr()
    torch.testing.assert_close(out, want)
    small = b.clone()  # the sum is larger than the conv output: a new tensor
    out = _fold._add_into(small, a)
    assert out.data_ptr() != small.data_ptr() and torch.equal(small, b)
    torch.testing.assert_close(out, want)
    wide = a.double()  # the sum promotes to float64: a new tensor
    out = _fold._add_into(a.clone(), wide)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, a.double() + wide)
