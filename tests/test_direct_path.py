"""The attack-time shortcut of the masked ops: frozen weights whose forward and input
gradient go to the torch reference run as the plain torch op on the masked weight (no
custom op). Oracles: the independent torch formula (bitwise: the same aten kernels), and a
fake timer and a fake sparse candidate that make the dispatch choice observable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends

import sparse_adv_fast as saf
from sparse_adv_fast import backends
from sparse_adv_fast.backends import _autotune
from sparse_adv_fast.ops import _cache, op_module

conv_mod = op_module("masked_conv2d")
lin_mod = op_module("masked_linear")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(_autotune.ENV_CACHE, str(tmp_path / "dispatch.json"))
    monkeypatch.delenv(_autotune.ENV_AUTOTUNE, raising=False)
    backends.use("auto")
    backends.reset()
    yield
    backends.reset()


def _count_ops(monkeypatch, mod) -> list[int]:
    calls = [0]
    real = mod._op

    def counted(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(mod, "_op", counted)
    return calls


def _conv_layer() -> saf.nn.MaskedConv2d:
    torch.manual_seed(0)
    layer = saf.sparsify(torch.nn.Conv2d(3, 8, 3, padding=1, bias=True))
    return saf.prune.magnitude(layer, 0.7)


def _linear_layer() -> saf.nn.MaskedLinear:
    torch.manual_seed(1)
    return saf.prune.magnitude(saf.sparsify(torch.nn.Linear(12, 5)), 0.6)


CASES = {
    "conv": (conv_mod, _conv_layer, lambda: torch.rand(4, 3, 6, 6),
             lambda m, x: F.conv2d(x, m.weight * m.weight_mask, m.bias, padding=1)),
    "linear": (lin_mod, _linear_layer, lambda: torch.rand(7, 12),
               lambda m, x: F.linear(x, m.weight * m.weight_mask, m.bias)),
}


def _attack_step(layer, x):
    """What an attack does: a forward and the input gradient, weights frozen."""
    xa = x.clone().requires_grad_(True)
    out = layer(xa)
    (g,) = torch.autograd.grad((out * out).sum(), xa)
    return out.detach(), g


@pytest.mark.parametrize("kind", list(CASES))
def test_frozen_torch_path_skips_the_custom_op_and_matches_the_formula(monkeypatch, kind):
    mod, make, data, formula = CASES[kind]
    layer, x = make(), data()
    calls = _count_ops(monkeypatch, mod)
    xr = x.clone().requires_grad_(True)
    ref = formula(layer, xr)
    (gref,) = torch.autograd.grad((ref * ref).sum(), xr)
    layer.requires_grad_(False)
    with backends.using("torch"), _cache.frozen(layer):
        out, g = _attack_step(layer, x)
    assert calls[0] == 0
    assert torch.equal(out, ref.detach()) and torch.equal(g, gref)


@pytest.mark.parametrize("kind", list(CASES))
def test_training_and_unfrozen_calls_keep_the_custom_op(monkeypatch, kind):
    mod, make, data, _ = CASES[kind]
    layer, x = make(), data()
    calls = _count_ops(monkeypatch, mod)
    with backends.using("torch"):
        layer(x).sum().backward()  # weights take gradients: the op (masked grad_weight)
        assert calls[0] == 1 and layer.weight.grad is not None
        layer.requires_grad_(False)
        layer(x)  # frozen weights but no attack scope: the op
        assert calls[0] == 2


class _Fake:
    """A sparse candidate that computes the reference and records that it ran."""

    def __init__(self, ref) -> None:
        self.ref, self.ran = ref, []

    def __getattr__(self, direction):
        fn = getattr(self.ref, direction)

        def run(*args):
            self.ran.append(direction)
            return fn(*args)

        return run


@pytest.mark.parametrize("sparse_wins", [False, True])
@pytest.mark.parametrize("kind", list(CASES))
def test_auto_takes_the_shortcut_once_it_has_chosen(monkeypatch, kind, sparse_wins):
    mod, make, data, formula = CASES[kind]
    fake = _Fake(mod._REF)
    monkeypatch.setattr(backends, "_candidates", lambda op, device: {"cpp-sparse": fake})

    def timer(key, fns):
        return {n: (1.0 if (n == "cpp-sparse") == sparse_wins else 2.0) for n in fns}

    layer, x = make(), data()
    layer.requires_grad_(False)
    calls = _count_ops(monkeypatch, mod)
    xr = x.clone().requires_grad_(True)
    ref = formula(layer, xr)
    (gref,) = torch.autograd.grad((ref * ref).sum(), xr)
    with _autotune.use_timer(timer), _cache.frozen(layer):
        for _ in range(3):
            out, g = _attack_step(layer, x)
            torch.testing.assert_close(out, ref.detach())
            torch.testing.assert_close(g, gref)
    # The first call measures through the op; later ones skip it either way.
    assert calls[0] == 1
    if sparse_wins:  # the chosen kernel keeps running, called directly, every time
        assert fake.ran.count("forward") >= 3 and fake.ran.count("grad_input") >= 3
    else:  # the candidate is checked once, then the plain torch op runs
        assert fake.ran.count("forward") <= 1 and fake.ran.count("grad_input") <= 1


@pytest.mark.skipif("cpp" not in cpu_backends(), reason="needs a C++ compiler")
@pytest.mark.parametrize("kind", list(CASES))
def test_forced_sparse_kernels_run_without_the_op_and_match_the_formula(monkeypatch, kind):
    """A forced cpp backend on its sparse path inside an attack: no custom op, and the
    output and input gradient agree with the formula (the autograd function's backward)."""
    from sparse_adv_fast.backends import _cpp_ops

    for name in ("LINEAR_SPARSE_DENSITY", "CONV_SPARSE_DENSITY"):
        monkeypatch.setattr(_cpp_ops, name, 1.0)
    mod, make, data, formula = CASES[kind]
    layer, x = make(), data()
    xr = x.clone().requires_grad_(True)
    ref = formula(layer, xr)
    (gref,) = torch.autograd.grad((ref * ref).sum(), xr)
    layer.requires_grad_(False)
    calls = _count_ops(monkeypatch, mod)
    with backends.using("cpp"), _cache.frozen(layer):
        out, g = _attack_step(layer, x)
        forms = [k for e in _cache._entries.values() for k in e.forms]
    assert calls[0] == 0
    assert any(k.startswith("csr") for k in forms), forms  # the sparse kernels ran
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(g, gref)


def test_nd_linear_inputs_keep_the_op(monkeypatch):
    layer = _linear_layer().requires_grad_(False)
    calls = _count_ops(monkeypatch, lin_mod)
    with backends.using("torch"), _cache.frozen(layer):
        layer(torch.rand(2, 3, 12))
    assert calls[0] == 1
