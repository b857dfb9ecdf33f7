"""Masks hold however a weight is written (issue 8, item 1).

Every way of writing a masked layer's weight must give exactly ``F.linear / F.conv2d`` of
``weight * mask`` for the weight as written, on the torch, cpp dense and cpp sparse (CSR)
paths and through an attack, including writes that bump no version (``.data``), which the
derived-form cache cannot see. The oracle is torch's own layer function on a copy of the
written weight. The cache must still make an attack's repeated forwards free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends
from tolerances import assert_close
from torch import nn

import sparse_adv_fast as saf
from sparse_adv_fast import backends
from sparse_adv_fast.backends import _cpp_ops
from sparse_adv_fast.ops import _cache

_THRESHOLDS = ("LINEAR_SPARSE_DENSITY", "CONV_SPARSE_DENSITY", "CONV_GRAD_WEIGHT_SPARSE_DENSITY")
# The form each path builds for a weight: proof that the fixture really selected the path.
_PATH_FORM = {"torch": "masked_in_place", "cpp-dense": "masked_in_place", "cpp-sparse": "csr"}


@contextlib.contextmanager
def forced_path(name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run on one CPU path: ``torch`` (the reference), ``cpp-dense`` / ``cpp-sparse`` (the
    cpp backend with every density threshold at 0, i.e. BLAS on the masked weight, or at 1,
    i.e. the CSR kernels) or ``triton`` (the interpreter); skips when it cannot run here."""
    backend = name.split("-")[0]
    if backend not in cpu_backends():
        pytest.skip(f"the {backend} backend cannot run CPU tensors here")
    if backend == "cpp":
        for attr in _THRESHOLDS:
            monkeypatch.setattr(_cpp_ops, attr, 1.0 if name == "cpp-sparse" else 0.0)
    _cache.clear()
    try:
        with backends.using(backend):
            yield
    finally:
        _cache.clear()


@pytest.fixture(params=["torch", "cpp-dense", "cpp-sparse"])
def path(request, monkeypatch):
    with forced_path(request.param, monkeypatch):
        yield request.param


def _layer(kind: str) -> nn.Module:
    layer = saf.nn.MaskedLinear(7, 5) if kind == "linear" else saf.nn.MaskedConv2d(3, 4, 3,
                                                                                  padding=1)
    layer.set_mask(torch.rand(layer.weight.shape) < 0.5)
    return layer


def _input(kind: str) -> torch.Tensor:
    return torch.randn(3, 7) if kind == "linear" else torch.randn(2, 3, 5, 5)


def _oracle(kind: str, x, w, mask, b):
    return F.linear(x, w * mask, b) if kind == "linear" else F.conv2d(x, w * mask, b, padding=1)


def _built(kind_prefix: str) -> bool:
    return any(k.startswith(kind_prefix) for k in _cache.stats.by_kind)


# ---- the idioms: each writes new values into layer.weight its own way ----------------------
class PlainSGD:
    """An optimizer that is not a ``torch.optim.Optimizer`` (no step hook fires): it writes
    the parameters in place through ``.data``, as many hand-rolled optimizers do."""

    def __init__(self, params, lr: float) -> None:
        self.params, self.lr = list(params), lr

    def step(self) -> None:
        for p in self.params:
            p.data.add_(p.grad, alpha=-self.lr)


def _grads(layer: nn.Module, x: torch.Tensor) -> None:
    """Gradients with a term on the raw weight, so a step also moves pruned positions (as
    a regulariser outside the layer would)."""
    layer.zero_grad()
    (layer(x).sum() + (layer.weight - 1).square().sum()).backward()


def _hand_sgd(layer, t, x):
    _grads(layer, x)
    with torch.no_grad():
        for p in layer.parameters():
            p -= 0.1 * p.grad


def _plain_optimizer(layer, t, x):
    opt = PlainSGD(layer.parameters(), lr=0.1)
    _grads(layer, x)
    opt.step()


def _data_assign(layer, t, x):
    layer.weight.data = t.clone()


def _copy_no_grad(layer, t, x):
    with torch.no_grad():
        layer.weight.copy_(t)


IDIOMS = {
    "data_copy": lambda layer, t, x: layer.weight.data.copy_(t),
    "data_assign": _data_assign,
    "copy_no_grad": _copy_no_grad,
    "nn_init_normal": lambda layer, t, x: nn.init.normal_(layer.weight),
    "nn_init_kaiming": lambda layer, t, x: nn.init.kaiming_uniform_(layer.weight),
    "load_state_dict": lambda layer, t, x: layer.load_state_dict({**layer.state_dict(),
                                                                  "weight": t}),
    "hand_sgd_no_grad": _hand_sgd,
    "plain_optimizer": _plain_optimizer,
}
_REMASKS_ON_WRITE = {"load_state_dict"}  # the layer's own loader zeroes pruned positions


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("idiom", sorted(IDIOMS))
def test_forward_and_grads_use_the_weight_as_written(path, idiom, kind):
    layer, x = _layer(kind), _input(kind)
    mask = layer.weight_mask
    layer(x).sum().backward()  # the path's forms are now built for the old weight
    assert _built(_PATH_FORM[path])
    old = layer.weight.detach().clone()
    IDIOMS[idiom](layer, torch.randn_like(layer.weight), x)
    written = layer.weight.detach().clone()
    assert not torch.equal(written[mask], old[mask]), "the write must change kept weights"
    if idiom not in _REMASKS_ON_WRITE:
        assert bool((written[~mask] != 0).any()), "the write must revive pruned weights"

    layer.zero_grad()
    xg = x.clone().requires_grad_()
    y = layer(xg)
    gy = torch.randn_like(y)
    y.backward(gy)
    w_ref = written.clone().requires_grad_()
    b_ref = layer.bias.detach().clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    y_ref = _oracle(kind, x_ref, w_ref, mask, b_ref)
    y_ref.backward(gy)
    assert_close(y, y_ref, msg=f"{path} {idiom}: forward")
    assert_close(xg.grad, x_ref.grad, msg=f"{path} {idiom}: grad_x")
    assert_close(layer.weight.grad, w_ref.grad, msg=f"{path} {idiom}: grad_w")
    assert torch.all(layer.weight.grad[~mask] == 0)


def _channels_last(layer):
    return layer.to(memory_format=torch.channels_last)


CONVERSIONS = {
    "half": lambda layer: layer.half(),
    "double": lambda layer: layer.double(),
    "to_float64": lambda layer: layer.to(torch.float64),
    "channels_last": _channels_last,
}


@pytest.mark.parametrize("scoped", [False, True], ids=["unscoped", "frozen"])
@pytest.mark.parametrize(("kind", "convert"), [
    (k, c) for k in ("linear", "conv") for c in sorted(CONVERSIONS)
    if not (k == "linear" and c == "channels_last")  # a 4-D layout
])
def test_dtype_and_layout_moves_after_the_cache_was_built(path, kind, convert, scoped):
    """``.half()`` / ``.double()`` / ``.to()`` replace the weight's storage under the same
    Parameter: the forms built before must not serve the moved weight, even inside a
    :func:`_cache.frozen` scope, where forms are otherwise reused."""
    layer, x = _layer(kind), _input(kind)
    with _cache.frozen(layer) if scoped else contextlib.nullcontext():
        layer(x)
        assert _built(_PATH_FORM[path])
        CONVERSIONS[convert](layer)
        w = layer.weight
        xx = x.to(w.dtype)
        y = layer(xx)
    assert y.dtype == w.dtype
    expect = _oracle(kind, xx, w.detach(), layer.weight_mask, layer.bias.detach())
    assert_close(y, expect, dtype=w.dtype)


@pytest.mark.parametrize("write", ["data_copy", "data_assign"])
def test_functional_op_sees_data_writes_to_a_plain_weight(path, write):
    """The cache rule is the op's, not only the layer's: a raw weight passed to the
    functional op is never served stale either (the masked copy, not the weight, is cached)."""
    w, mask, x = torch.randn(5, 7), torch.rand(5, 7) < 0.5, torch.randn(3, 7)
    saf.ops.masked_linear(x, w, mask)
    t = torch.randn(5, 7)
    if write == "data_copy":
        w.data.copy_(t)
    else:
        w.data = t.clone()
    assert_close(saf.ops.masked_linear(x, w, mask), F.linear(x, t * mask))
    assert not torch.equal(w, w * mask), "a weight no layer owns is never written by the op"


# ---- through an attack ---------------------------------------------------------------------
def _model(dtype=torch.float64) -> nn.Module:
    model = saf.sparsify(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(3 * 4 * 4, 4))).to(dtype)
    saf.apply_masks(model, {n: torch.rand(m.weight.shape) < 0.5
                            for n, m in saf.nn.masked_layers(model).items()})
    return model


def _dense_oracle(model: nn.Module) -> nn.Module:
    """The same network in plain torch layers with weights ``weight * mask`` as written."""
    ref = saf.densify(_model(model[0].weight.dtype))
    with torch.no_grad():
        for i in (0, 3):
            ref[i].weight.copy_(model[i].weight * model[i].weight_mask)
            ref[i].bias.copy_(model[i].bias)
    return ref


_ATTACK = {"eps": 0.1, "alpha": 0.03, "steps": 5, "random_start": False}


@pytest.mark.parametrize("scoped", [False, True], ids=["unscoped", "frozen"])
def test_attack_sees_weights_rewound_through_data(path, scoped):
    model = _model()
    x, y = torch.rand(4, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (4,))
    saf.attacks.pgd(model, x, y, **_ATTACK)  # forms built for the old weights
    for layer in saf.nn.masked_layers(model).values():  # lottery-ticket style rewind
        layer.weight.data.copy_(torch.randn_like(layer.weight))
    oracle = _dense_oracle(model)
    with _cache.frozen(model) if scoped else contextlib.nullcontext():
        x_adv = saf.attacks.pgd(model, x, y, **_ATTACK)
    x_ref = saf.attacks.pgd(oracle, x, y, **_ATTACK)
    assert_close(x_adv, x_ref)
    with torch.no_grad():
        assert_close(model(x_adv), oracle(x_adv))


@pytest.mark.parametrize("explicit", [False, True], ids=["attack_mode", "explicit_scope"])
def test_attack_builds_each_form_once_not_per_step(path, explicit):
    """Inside the scope an attack runs in (its own attack_mode, or an explicit
    :func:`_cache.frozen` around it), PGD-10 over unchanged weights builds each form once,
    as PGD-1 does: the repeated forwards and backwards do no mask work."""
    model = _model(torch.float32)
    x, y = torch.rand(4, 1, 6, 6), torch.randint(0, 4, (4,))

    def builds(steps: int) -> dict[str, int]:
        _cache.stats.reset()
        with _cache.frozen(model) if explicit else contextlib.nullcontext():
            saf.attacks.pgd(model, x, y, eps=0.1, alpha=0.03, steps=steps)
        return dict(_cache.stats.by_kind)

    builds(1)  # mask-only forms (density, pattern) are built once here and then kept
    one, ten = builds(1), builds(10)
    assert any(k.startswith(_PATH_FORM[path]) for k in ten), ten
    assert ten == one, f"PGD-10 rebuilt forms per step: {ten} vs PGD-1 {one}"
    assert all(n <= 2 for n in ten.values()), ten  # two masked layers: one build each
    assert _cache.stats.hits >= 10


def test_training_step_builds_each_form_once(path):
    """Outside any scope each forward builds its forms afresh (the weight may have been
    written through ``.data``), and the backward of that forward reuses them."""
    model = _model(torch.float32)
    x = torch.rand(4, 1, 6, 6)
    model(x).sum().backward()
    _cache.stats.reset()
    model(x).sum().backward()
    built = dict(_cache.stats.by_kind)
    assert any(k.startswith(_PATH_FORM[path]) for k in built), built
    assert all(n <= 2 for n in built.values()), built
    assert _cache.stats.hits >= 1


# ---- densified layers are no longer the masked layer's ------------------------------------
def _pruned_index(layer) -> tuple[int, ...]:
    return tuple(int(i) for i in (~layer.weight_mask).nonzero()[0])


@pytest.mark.parametrize("how", ["densify", "to_dense"])
def test_densified_layer_is_not_remasked_by_the_optimizer(how):
    model = _model(torch.float32)
    masked = model[3]  # kept alive: the hook must still not find it for the shared weight
    if how == "densify":
        model = saf.densify(model)
        dense = model[3]
    else:
        dense = model[3] = masked.to_dense()
    assert type(dense) is nn.Linear and dense.weight is masked.weight
    idx = _pruned_index(masked)
    with torch.no_grad():
        dense.weight[idx] = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        model(torch.rand(4, 1, 6, 6)).sum().backward()
        opt.step()
    assert float(dense.weight.detach()[idx]) != 0.0
    # The retired masked layer still computes masked outputs, without writing the weight.
    x = torch.randn(2, 48)
    before = dense.weight.detach().clone()
    assert_close(masked(x), F.linear(x, before * masked.weight_mask, masked.bias))
    assert torch.equal(dense.weight, before)


def test_resparsified_layer_owns_its_weight_again():
    masked = _model(torch.float32)[3]
    dense = masked.to_dense()
    again = saf.nn.MaskedLinear.from_dense(dense, masked.weight_mask.clone())
    with torch.no_grad():
        again.weight.fill_(1.0)
    opt = torch.optim.SGD(again.parameters(), lr=0.1)
    opt.zero_grad()
    again(torch.randn(2, 48)).sum().backward()
    opt.step()
    assert torch.all(again.weight[~again.weight_mask] == 0)



# ---- the native form kernels the cpp backend registers ------------------------------------
@pytest.mark.skipif("cpp" not in cpu_backends(), reason="the cpp backend needs a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_native_masking_and_csr_gather_match_torch(dtype, monkeypatch):
    ext = backends.cpp.loader("masked_linear")._ext
    w, mask = torch.randn(9, 40).to(dtype), torch.rand(9, 40) < 0.3
    t = w.clone()
    ext.zero_pruned_(t, mask)
    assert torch.equal(t, w * mask)
    if dtype == torch.float16:
        return  # the CSR kernels take float32/float64 only
    for index in (torch.int16, torch.int32):
        rowptr, col = _cpp_ops._pattern(mask, index)
        assert torch.equal(ext.csr_values(w, rowptr, col), w[mask])
        monkeypatch.setattr(_cpp_ops, "_native", None)  # an older build without the kernels
        assert torch.equal(_cpp_ops._values(w, rowptr, col), w[mask])
        monkeypatch.undo()
