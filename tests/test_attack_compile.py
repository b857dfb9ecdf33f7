"""``torch.compile`` through the custom ops: a compiled attack equals the eager one.

``pgd(..., compile=...)`` compiles the model's forward and backward once per model. The
fast tests use the ``aot_eager`` backend (AOTAutograd traces forward and backward through
the ops' fake kernels and registered autograd, without code generation); one ``slow`` test
runs inductor's C++ code generation end to end.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close
from torch import nn

import sparse_adv_fast as saf
from sparse_adv_fast.attacks import _core

ATTACK = {"eps": 8 / 255, "alpha": 2 / 255, "steps": 3}


def _tiny_sparse_cnn() -> nn.Module:
    """Conv-ReLU-conv-ReLU-linear with MaskedConv2d/MaskedLinear at 50 % sparsity."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 4),
    )
    saf.sparsify(net)
    saf.prune.random(net, 0.5)
    return net


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(5, 3, 8, 8, generator=g), torch.randint(0, 4, (5,), generator=g)


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(nn.functional.cross_entropy(model(x), y), x)[0]


def _check_compiled_matches_eager(backend: str) -> None:
    torch._dynamo.reset()
    net = _tiny_sparse_cnn()
    x, y = _data()
    fast = _core.compiled(net, backend)
    assert _core.compiled(net, backend) is fast  # built once per model, reused
    assert_close(fast(x), net(x))
    assert_close(_input_grad(fast, x, y), _input_grad(net, x, y))
    calls = []
    fast.register_forward_pre_hook(lambda m, a: calls.append(1))  # the compiled module runs
    for random_start in (False, True):
        torch.manual_seed(7)
        want = saf.attacks.pgd(net, x, y, random_start=random_start, **ATTACK)
        assert not calls
        torch.manual_seed(7)
        got = saf.attacks.pgd(net, x, y, random_start=random_start, compile=backend, **ATTACK)
        assert calls, "pgd(compile=...) must run the compiled module"
        calls.clear()
        assert_close(got, want)
    assert net.training and all(p.requires_grad for p in net.parameters())  # restored


def test_compiled_attack_equals_eager_aot_eager():
    _check_compiled_matches_eager("aot_eager")


def test_compiled_model_sees_mask_changes():
    torch._dynamo.reset()
    net = _tiny_sparse_cnn()
    x, _ = _data()
    fast = _core.compiled(net, "aot_eager")
    fast(x)
    saf.prune.magnitude(net, 0.8)  # masks are shared buffers: the compiled model follows
    assert_close(fast(x), net(x))


@pytest.mark.slow
def test_compiled_attack_equals_eager_inductor():
    _check_compiled_matches_eager("inductor")
