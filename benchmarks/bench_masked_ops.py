"""masked_linear / masked_conv2d against dense torch and torch.nn.utils.prune-style masking.

Groups: ``<op> <shape> <step> sparsity=<s>`` with ``step`` one of

* ``train``  - forward + backward with grads for x, w and b, then an SGD update of w and b
  (a training step: the weight changes every iteration);
* ``attack`` - forward + backward with a grad for x only (a PGD step on a fixed model,
  inside the frozen-weights scope every ``saf.attacks`` call holds).

``test_masked_conv2d_resnet_shapes`` times the attack step at the four 3x3 conv shapes of
a full-width CIFAR ResNet-18 (64@32² ... 512@4², batch 32) on 1 and 2 threads.
``test_layer_training_step`` times a training step through the layers themselves
(``MaskedLinear`` / ``MaskedConv2d`` with ``torch.optim.SGD``) at density 0.5.

Entries: ``dense`` (plain ``F.linear``/``F.conv2d`` on an unmasked weight: the baseline),
``prune`` (``weight_orig * mask`` recomputed every call, as torch.nn.utils.prune does),
``masked-<backend>`` (this library on each available backend) and, for the linear attack
step, ``torch-csr`` (``torch.sparse.mm`` on a prebuilt CSR of the same masked weight).

Run: ``python -m pytest benchmarks/bench_masked_ops.py --benchmark-only
--benchmark-json out.json`` then ``python benchmarks/report.py out.json``.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune

from sparse_adv_fast import backends
from sparse_adv_fast.ops import _cache, masked_conv2d, masked_linear

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.99)
STEPS = ("train", "attack")
ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
BACKENDS = ("torch", "cuda", "triton") if ON_GPU else ("torch", "cpp")
ROUNDS = dict(rounds=5, warmup_rounds=2, iterations=1)

LIN = (256, 2048, 2048)  # batch, in, out
CONV = (32, 64, 32, 32, 64, 3)  # N, C, H, W, OC, k (padding 1)


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def _mask(shape, sparsity: float) -> torch.Tensor:
    return torch.rand(shape, device=DEV) >= sparsity


def _run(benchmark, group: str, impl: str, fn) -> None:
    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    if impl == "dense":
        benchmark.extra_info["baseline"] = True

    def step():
        fn()
        _sync()

    benchmark.pedantic(step, **ROUNDS)


def _backward(y, leaves):
    """Backward, then (training: the parameters among ``leaves`` need grad) an SGD step, so
    the weight changes every iteration as in real training and any remask or rebuild of
    derived forms is counted."""
    y.backward(torch.ones_like(y))
    with torch.no_grad():
        for t in leaves[1:]:
            t.sub_(1e-6 * t.grad)
    for t in leaves:
        t.grad = None


def _scope(step: str, impl: str, w: torch.Tensor):
    """An attack holds the weights frozen for its whole run (``saf.attacks`` enters
    ``_cache.frozen``), so the masked forms are built once, not per step."""
    if step == "attack" and impl.startswith("masked-"):
        return _cache.frozen([w])
    return contextlib.nullcontext()


def _impl_ready(name: str) -> None:
    why = backends._reason(name, torch.device(DEV))
    if why is not None:
        pytest.skip(f"{name}: {why}")


IMPLS = ["dense", "prune", *(f"masked-{b}" for b in BACKENDS), "torch-csr"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_masked_linear(benchmark, sparsity, step, impl):
    if impl == "torch-csr" and step != "attack":
        pytest.skip("torch-csr is the peer for the attack step only")
    bsz, k, n = LIN
    x = torch.randn(bsz, k, device=DEV, requires_grad=True)
    w = torch.randn(n, k, device=DEV, requires_grad=step == "train")
    b = torch.randn(n, device=DEV, requires_grad=step == "train")
    mask = _mask(w.shape, sparsity)
    leaves = [x, w, b] if step == "train" else [x]
    group = f"masked_linear {bsz}x{k}->{n} {step} sparsity={sparsity}"
    if impl == "dense":
        fn = lambda: _backward(F.linear(x, w, b), leaves)  # noqa: E731
    elif impl == "prune":
        fn = lambda: _backward(F.linear(x, w * mask, b), leaves)  # noqa: E731
    elif impl == "torch-csr":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            csr = (w.detach() * mask).to_sparse_csr()
        fn = lambda: _backward(torch.sparse.mm(csr, x.t()).t() + b, leaves)  # noqa: E731
    else:
        name = impl.removeprefix("masked-")
        _impl_ready(name)

        def fn():
            with backends.using(name):
                _backward(masked_linear(x, w, mask, b), leaves)

    with _scope(step, impl, w):
        _run(benchmark, group, impl, fn)


@pytest.mark.parametrize("impl", IMPLS[:-1])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_masked_conv2d(benchmark, sparsity, step, impl):
    nb, c, h, wd, oc, k = CONV
    x = torch.randn(nb, c, h, wd, device=DEV, requires_grad=True)
    w = torch.randn(oc, c, k, k, device=DEV, requires_grad=step == "train")
    b = torch.randn(oc, device=DEV, requires_grad=step == "train")
    mask = _mask(w.shape, sparsity)
    leaves = [x, w, b] if step == "train" else [x]
    group = f"masked_conv2d {nb}x{c}x{h}x{wd}->{oc} k{k} {step} sparsity={sparsity}"
    if impl == "dense":
        fn = lambda: _backward(F.conv2d(x, w, b, 1, 1), leaves)  # noqa: E731
    elif impl == "prune":
        fn = lambda: _backward(F.conv2d(x, w * mask, b, 1, 1), leaves)  # noqa: E731
    else:
        name = impl.removeprefix("masked-")
        _impl_ready(name)

        def fn():
            with backends.using(name):
                _backward(masked_conv2d(x, w, mask, b, 1, 1), leaves)

    with _scope(step, impl, w):
        _run(benchmark, group, impl, fn)


# The 3x3 body convolutions of a full-width CIFAR ResNet-18 (C -> C at H x W, padding 1).
RESNET_CONVS = ((64, 32), (128, 16), (256, 8), (512, 4))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("impl", ["dense", *(f"masked-{b}" for b in BACKENDS[1:])])
@pytest.mark.parametrize("sparsity", (0.9, 0.95))
@pytest.mark.parametrize("shape", RESNET_CONVS, ids=lambda s: f"{s[0]}at{s[1]}")
def test_masked_conv2d_resnet_shapes(benchmark, shape, sparsity, impl, threads):
    """The attack step (forward + grad_x, frozen weights) at each ResNet stage's shape,
    batch 32, on 1 and 2 threads: the per-layer targets of the sparse conv kernel."""
    c, hw = shape
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(32, c, hw, hw, device=DEV, requires_grad=True)
        w = torch.randn(c, c, 3, 3, device=DEV)
        mask = _mask(w.shape, sparsity)
        group = (f"masked_conv2d resnet 32x{c}x{hw}x{hw} attack sparsity={sparsity} "
                 f"threads={threads}")
        if impl == "dense":
            fn = lambda: _backward(F.conv2d(x, w, None, 1, 1), [x])  # noqa: E731
        else:
            name = impl.removeprefix("masked-")
            _impl_ready(name)

            def fn():
                with backends.using(name):
                    _backward(masked_conv2d(x, w, mask, None, 1, 1), [x])

        with _scope("attack", impl, w):
            _run(benchmark, group, impl, fn)
    finally:
        torch.set_num_threads(prev)


LAYER_IMPLS = ("dense", "torch-prune", "saf")


@pytest.mark.parametrize("impl", LAYER_IMPLS)
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_layer_training_step(benchmark, layer, impl):
    """A training step through the layers as other training code uses them: forward,
    backward and ``torch.optim.SGD`` (momentum 0.9) on one layer at density 0.5, so every
    remask, gradient mask and optimizer pass is counted. ``dense``: ``nn.Linear`` /
    ``nn.Conv2d`` (the baseline); ``torch-prune``: the same layer under
    ``torch.nn.utils.prune``; ``saf``: ``sparsify``'d to ``MaskedLinear`` / ``MaskedConv2d``."""
    import copy

    import sparse_adv_fast as saf

    torch.manual_seed(0)
    if layer == "linear":
        bsz, k, n = LIN
        base, x = torch.nn.Linear(k, n), torch.randn(bsz, k)
        group = f"layer training step linear {bsz}x{k}->{n} density=0.5"
    else:
        nb, c, h, wd, oc, ks = CONV
        base, x = torch.nn.Conv2d(c, oc, ks, padding=1), torch.randn(nb, c, h, wd)
        group = f"layer training step conv {nb}x{c}x{h}x{wd}->{oc} k{ks} density=0.5"
    net = torch.nn.Sequential(copy.deepcopy(base)).to(DEV)
    x = x.to(DEV)
    if impl == "torch-prune":
        torch_prune.random_unstructured(net[0], "weight", amount=0.5)
    elif impl == "saf":
        saf.sparsify(net)
        saf.prune.random(net, 0.5, scope="layer")
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)

    def fn():
        loss = net(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _run(benchmark, group, impl, fn)
