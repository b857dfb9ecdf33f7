"""Attack benchmarks (CPU or GPU): the library's PGD against the common naive loop.

* ``pgd10``: a full PGD-10 attack (L∞, eps 8/255, step 2/255, random start) with
  ``saf.attacks.pgd`` (eval mode, frozen parameters, ``autograd.grad`` on the input only,
  fused ``pgd_step_``) against an eager loop with parameter grads on (``loss.backward()``
  each step, grads accumulating on every weight, unfused step): on a 90%-sparse small CNN
  (``saf.models.small_cnn``) and on a narrow CIFAR-style ResNet-18 (``saf.models.resnet18``,
  width 1/4, small batch, so it stays quick on CPU).
* ``restarts``: R = 4 restarts of PGD-10 as one batch of 4·B rows with the per-sample
  select, against 4 sequential runs plus the same select.

Run: ``python -m pytest benchmarks/bench_attacks.py --benchmark-only
--benchmark-json out.json`` then ``python benchmarks/report.py out.json``. On a shared CPU
set ``OMP_NUM_THREADS=1``: oversubscribed OpenMP threads spin and swamp the timings.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_adv_fast as saf
from sparse_adv_fast.attacks import pgd
from sparse_adv_fast.ops.restart_select import select_restarts

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10
ROUNDS, WARMUP = 5, 1
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, fn, group: str, impl: str, baseline: bool = False):
    def timed():
        out = fn()
        _sync()
        return out

    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["device"] = str(DEV)
    if baseline:
        benchmark.extra_info["baseline"] = True
    return benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


def _prune_(model: nn.Module, sparsity: float) -> nn.Module:
    """Sparsify and keep the largest-|w| (1 - sparsity) of each masked layer."""
    saf.sparsify(model)
    for m in model.modules():
        # In-place ReLU on a masked layer's output is refused by autograd today (the op's
        # output is reported as a view); not what is measured here.
        if isinstance(m, nn.ReLU):
            m.inplace = False
    for layer in saf.nn.masked_layers(model).values():
        w = layer.weight.detach().abs().flatten()
        k = max(1, int(round(w.numel() * (1 - sparsity))))
        thresh = w.kthvalue(w.numel() - k + 1).values
        layer.set_mask(layer.weight.detach().abs() >= thresh)
    return model


def _cases():
    torch.manual_seed(0)
    cnn = _prune_(saf.models.small_cnn(in_channels=3, num_classes=10, image_size=16), 0.9)
    res = saf.models.resnet18(num_classes=10, width=0.25)
    return {
        "small_cnn 90% sparse, B=64, 3x16x16": (cnn, torch.rand(64, 3, 16, 16)),
        "resnet18 w=1/4 dense, B=8, 3x32x32": (res, torch.rand(8, 3, 32, 32)),
    }


CASES = _cases()


def eager_pgd(model: nn.Module, x, y, eps=EPS, alpha=ALPHA, steps=STEPS):
    """The common naive loop: parameter grads on and accumulating, unfused step."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        loss.backward()
        with torch.no_grad():
            x_adv = x_adv + alpha * x_adv.grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["eager loop (param grads)", "saf.attacks.pgd"])
def test_pgd10(benchmark, case, impl):
    model, x = CASES[case]
    model = model.to(DEV).eval()
    x = x.to(DEV)
    y = torch.randint(0, 10, (x.shape[0],), device=DEV)
    if impl == "saf.attacks.pgd":
        fn = lambda: pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS)
    else:
        fn = lambda: eager_pgd(model, x, y)
    _run(benchmark, fn, f"pgd10 {case}", impl, baseline=impl.startswith("eager"))
    model.zero_grad(set_to_none=True)


def _sequential(model, x, y, r):
    runs = [pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS) for _ in range(r)]
    cands = torch.cat(runs)
    with torch.no_grad():
        logits = model(cands)
    yr = y.repeat(r)
    losses = F.cross_entropy(logits, yr, reduction="none")
    return select_restarts(cands, losses, r, fooled=logits.argmax(1) != yr)


@pytest.mark.parametrize("impl", ["4 sequential runs", "batched R=4"])
def test_restarts(benchmark, impl):
    case = "small_cnn 90% sparse, B=64, 3x16x16"
    model, x = CASES[case]
    model = model.to(DEV).eval()
    x = x[:32].to(DEV)
    y = torch.randint(0, 10, (x.shape[0],), device=DEV)
    if impl == "batched R=4":
        fn = lambda: pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, restarts=4)
    else:
        fn = lambda: _sequential(model, x, y, 4)
    _run(benchmark, fn, "pgd10 R=4 restarts, small_cnn 90% sparse, B=32", impl,
         baseline=impl.startswith("4 sequential"))
