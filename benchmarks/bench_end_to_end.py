"""End-to-end benchmarks: whole attacks and an adversarial-training epoch, in images/s.

What is timed (L∞, eps 8/255):

* ``pgd10``      PGD-10 (step 2/255, random start) on one batch;
* ``apgd_ce100`` APGD-CE with 100 iterations (``apgd_ce20`` in the quick subset);
* ``pgdat``      one PGD-AT epoch (PGD-10 inner attack, SGD step per batch) on a few
  batches.

Models (CIFAR shapes 3x32x32, 10 classes, widths that fit a 2-core CPU): ``small_cnn``,
``resnet18`` (width 1/4), ``vgg16`` (width 1/4). Sparsity: ``dense``; layer-wise 90/95/99 %
with the first conv and the last linear dense (``layer90`` ...); global 90/95 % over the
same layers (``global90`` ...). Magnitude pruning of the seeded initial weights.

Implementations in each group (one group per task x model x sparsity):

* ``saf``            this library, backend ``auto`` (dispatch by measurement);
* ``saf-torch``      this library with the ``torch`` backend forced;
* ``torchattacks``   ``torchattacks`` on the same weights in plain dense layers
  (``saf.densify`` of a copy) — the baseline of the attack groups;
* ``torch-prune``    an eager loop over ``torch.nn.utils.prune``'s reparametrisation of the
  same masks (``saf.prune.to_torch_prune``) — the baseline of the training groups.

Every row stores ``images`` (per timed call) and ``mac_ideal`` (dense MACs / non-zero MACs
of one forward) in ``extra_info``; ``benchmarks/report.py`` prints images/s, the speed-up
over the group's baseline and the fraction of the MAC ideal it reaches.

An ``overhead`` group times a dense PGD-10 through ``saf.attacks.pgd`` against a bare loop
over the same fused ops on the same frozen, folded model: the cost of the attack's checks
(goal: at most 3 %). Attacks take the model's clean predictions as labels.

Run: ``python -m pytest benchmarks/bench_end_to_end.py --benchmark-only
--benchmark-json out.json`` (``-m quick`` for the subset), then
``python benchmarks/report.py out.json``. Sizes: ``SAF_E2E_BATCH`` (default 32),
``SAF_E2E_BATCHES`` (PGD-AT epoch length, default 4), ``SAF_E2E_ROUNDS`` (default 3).
On a shared CPU set ``OMP_NUM_THREADS`` to the cores you own.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_adv_fast as saf
from sparse_adv_fast import backends
from sparse_adv_fast.attacks import _fold, _hygiene

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10
BATCH = int(os.environ.get("SAF_E2E_BATCH", "32"))
BATCHES = int(os.environ.get("SAF_E2E_BATCHES", "4"))
ROUNDS = int(os.environ.get("SAF_E2E_ROUNDS", "3"))
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.end_to_end

MODELS: dict[str, Callable[[], nn.Module]] = {
    "small_cnn": lambda: saf.models.small_cnn(in_channels=3, num_classes=10, image_size=32),
    "resnet18": lambda: saf.models.resnet18(num_classes=10, width=0.25),
    "vgg16": lambda: saf.models.vgg16(num_classes=10, width=0.25),
}
SPARSITY = {"dense": None, "layer90": ("layer", 0.9), "layer95": ("layer", 0.95),
            "layer99": ("layer", 0.99), "global90": ("global", 0.9),
            "global95": ("global", 0.95)}
TASKS = ("pgd10", "apgd_ce100", "apgd_ce20", "pgdat")
IMPLS = ("saf", "saf-torch", "torchattacks", "torch-prune")
QUICK = {("pgd10", "small_cnn", "dense"), ("pgd10", "small_cnn", "layer90"),
         ("pgd10", "resnet18", "dense"), ("pgd10", "resnet18", "layer90"),
         ("apgd_ce20", "resnet18", "layer90"), ("pgdat", "small_cnn", "layer90")}


# ---- models, masks and MACs ---------------------------------------------------------------
def _ends(model: nn.Module) -> tuple[str, str]:
    """Names of the first conv and the last linear layer (kept dense)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    lins = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return convs[0], lins[-1]


def _macs(model: nn.Module) -> tuple[int, int]:
    """(dense, non-zero) multiply-accumulates of one forward of one image."""
    dense = kept = 0
    hooks = []

    def hook(mod, inp, out):
        nonlocal dense, kept
        pixels = out[0, 0].numel() if out.dim() == 4 else 1
        mask = getattr(mod, "weight_mask", None)
        nnz = int(mask.sum()) if mask is not None else mod.weight.numel()
        dense += pixels * mod.weight.numel()
        kept += pixels * nnz

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32, device=DEV))
    for h in hooks:
        h.remove()
    return dense, kept


_built: dict[tuple[str, str], tuple[nn.Module, float]] = {}


def _model(name: str, sparsity: str) -> tuple[nn.Module, float]:
    """The pruned library model (eval mode) and its MAC-reduction ideal, built once."""
    hit = _built.get((name, sparsity))
    if hit is None:
        torch.manual_seed(0)
        model = MODELS[name]().to(DEV).eval()
        first, last = _ends(model)
        saf.sparsify(model, exclude=(first, last))
        spec = SPARSITY[sparsity]
        if spec is not None:
            try:
                saf.prune.magnitude(model, spec[1], scope=spec[0])
            except ValueError as e:  # e.g. global pruning that would empty a layer
                pytest.skip(f"{name} {sparsity}: {e}")
        dense, kept = _macs(model)
        hit = _built[(name, sparsity)] = (model, dense / max(kept, 1))
    return hit


def _plain(model: nn.Module) -> nn.Module:
    return saf.densify(copy.deepcopy(model))


def _torch_prune(model: nn.Module) -> nn.Module:
    return saf.prune.to_torch_prune(copy.deepcopy(model))


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 32, 32, generator=g).to(DEV)
    return x, torch.randint(0, 10, (n,), generator=g).to(DEV)


def _clean_labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own predictions: every point starts correctly classified, as on an
    accurate model, so early-stopping attacks (APGD: saf and torchattacks alike attack only
    the points they have not broken yet) do a real evaluation's work, not one on the few
    points random labels happen to match."""
    was = model.training
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    model.train(was)
    return y


# ---- the peers' loops -----------------------------------------------------------------------
def _eager_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    """The common eager PGD loop: random start, grad w.r.t. the input, unfused step."""
    xa = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    for _ in range(steps):
        xa.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
        with torch.no_grad():
            xa = torch.min(torch.max(xa + ALPHA * g.sign(), x - EPS), x + EPS).clamp(0, 1)
    return xa.detach()


def _attack_fn(task: str, impl: str, model: nn.Module) -> Callable:
    steps = {"apgd_ce100": 100, "apgd_ce20": 20}.get(task, STEPS)
    if impl == "torchattacks":
        import torchattacks

        plain = _plain(model)
        atk = (torchattacks.PGD(plain, eps=EPS, alpha=ALPHA, steps=steps, random_start=True)
               if task == "pgd10" else
               torchattacks.APGD(plain, norm="Linf", eps=EPS, steps=steps, n_restarts=1,
                                 loss="ce", seed=0))
        return atk
    if impl == "torch-prune":
        tp = _torch_prune(model)
        return lambda x, y: _eager_pgd(tp, x, y, steps)
    if task == "pgd10":
        return lambda x, y: saf.attacks.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=steps)
    return lambda x, y: saf.attacks.apgd(model, x, y, eps=EPS, steps=steps, loss="ce")


def _epoch_fn(impl: str, model: nn.Module) -> Callable:
    """One PGD-AT epoch over ``BATCHES`` batches: attack, train-mode loss, SGD step."""
    if impl == "torchattacks":
        import torchattacks

        net = _plain(model)
        atk = torchattacks.PGD(net, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)

        def attack(x, y):
            return atk(x, y)
    elif impl == "torch-prune":
        net = _torch_prune(model)

        def attack(x, y):
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)
            try:
                return _eager_pgd(net, x, y, STEPS)
            finally:
                for p in net.parameters():
                    p.requires_grad_(True)
    else:  # saf.train's "pgd" method: the library attack, then the train-mode loss
        net = copy.deepcopy(model)

        def attack(x, y):
            return saf.attacks.pgd(net, x, y, eps=EPS, alpha=ALPHA, steps=STEPS)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x_all, y_all = _data(BATCH * BATCHES)

    def epoch():
        for i in range(BATCHES):
            x, y = x_all[i * BATCH:(i + 1) * BATCH], y_all[i * BATCH:(i + 1) * BATCH]
            xa = attack(x, y)
            net.train()
            loss = F.cross_entropy(net(xa), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return epoch


# ---- benchmarks -------------------------------------------------------------------------------
def _sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, fn: Callable[[], object], *, group: str, impl: str, baseline: bool,
         images: int, mac_ideal: float | None) -> None:
    def timed():
        out = fn()
        _sync()
        return out

    benchmark.group = group
    benchmark.extra_info.update(impl=impl, device=str(DEV), images=images,
                                threads=torch.get_num_threads())
    if mac_ideal is not None:
        benchmark.extra_info["mac_ideal"] = round(mac_ideal, 3)
    if baseline:
        benchmark.extra_info["baseline"] = True
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1, iterations=1)


def _params():
    for task in TASKS:
        for model in MODELS:
            for sp in SPARSITY:
                for impl in IMPLS:
                    if task.startswith("apgd") and impl == "torch-prune":
                        continue  # no eager APGD peer: torchattacks is the reference
                    in_quick = (task, model, sp) in QUICK
                    if task == "apgd_ce20" and not in_quick:
                        continue  # the 20-step APGD exists for the quick subset only
                    # the eager torch-prune loop is the training baseline; attacks' is torchattacks
                    quick = in_quick and (impl != "torch-prune" or task == "pgdat")
                    marks = [pytest.mark.quick] if quick else []
                    yield pytest.param(task, model, sp, impl, marks=marks,
                                       id=f"{task}-{model}-{sp}-{impl}")


@pytest.mark.parametrize(("task", "model_name", "sparsity", "impl"), list(_params()))
def test_end_to_end(benchmark, task, model_name, sparsity, impl):
    model, ideal = _model(model_name, sparsity)
    forced = "torch" if impl == "saf-torch" else "auto"
    group = f"{task} {model_name} {sparsity}"
    with backends.using(forced):
        if task == "pgdat":
            fn = _epoch_fn(impl, model)
            _run(benchmark, fn, group=group, impl=impl, baseline=impl == "torch-prune",
                 images=BATCH * BATCHES, mac_ideal=ideal)
            return
        atk = _attack_fn(task, impl, model)
        x, _ = _data(BATCH)
        y = _clean_labels(model, x)
        _run(benchmark, lambda: atk(x, y), group=group, impl=impl,
             baseline=impl == "torchattacks", images=BATCH, mac_ideal=ideal)


@pytest.mark.quick
@pytest.mark.parametrize("impl", ["bare-loop", "saf"])
def test_attack_overhead(benchmark, impl):
    """Dense PGD-10 via saf.attacks.pgd against a bare loop over the same fused ops."""
    model, _ = _model("resnet18", "dense")
    x, y = _data(BATCH)

    def bare():
        # The same frozen, batch-norm-folded model the attack searches on: the difference
        # is the attack's argument checks, finite-value checks and masking probe.
        with _hygiene.attack_mode(model), _fold.folded(model) as fm:
            xa = saf.ops.random_start(x, eps=EPS)
            for _ in range(STEPS):
                xg = xa.detach().requires_grad_(True)
                loss = F.cross_entropy(fm(xg), y, reduction="none").sum()
                (g,) = torch.autograd.grad(loss, xg)
                saf.ops.pgd_step_(xa, g, x, alpha=ALPHA, eps=EPS)
        return xa

    fn = bare if impl == "bare-loop" else (
        lambda: saf.attacks.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS))
    _run(benchmark, fn, group="overhead pgd10 resnet18 dense", impl=impl,
         baseline=impl == "bare-loop", images=BATCH, mac_ideal=None)
