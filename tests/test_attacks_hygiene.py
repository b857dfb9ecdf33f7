"""Evaluation hygiene (mode, frozen parameters, grads, BatchNorm stats), the
gradient-masking warning and bad-input errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sparse_adv_fast.attacks import (
    APGD,
    FGSM,
    PGD,
    GradientMaskingWarning,
    apgd,
    attack_mode,
    evaluate,
    fgsm,
    pgd,
)


def bn_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(3 * 4 * 4, 4),
    )


def run_all(model, x, y):
    yield "fgsm", fgsm(model, x, y, eps=0.1)
    yield "pgd", pgd(model, x, y, eps=0.1, alpha=0.03, steps=3, restarts=2)
    yield "pgd-es", pgd(model, x, y, eps=0.1, alpha=0.03, steps=3, early_stop=True)
    yield "apgd", apgd(model, x, y, eps=0.1, steps=4, loss="dlr")
    yield "evaluate", evaluate(model, [(x, y)], attacks=("fgsm", "pgd3"), eps=0.1)


def test_mode_requires_grad_grads_and_bn_stats_restored():
    model = bn_model().train()
    model[3].eval()  # a submodule in a different mode must keep it
    conv, bn, lin = model[0], model[1], model[5]
    conv.bias.requires_grad_(False)
    lin.weight.grad = torch.full_like(lin.weight, 0.25)
    stats = {k: v.clone() for k, v in bn.state_dict().items()}
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 4, (6,))
    for name, _ in run_all(model, x, y):
        assert model.training and bn.training and not model[3].training, name
        assert conv.weight.requires_grad and not conv.bias.requires_grad, name
        assert lin.weight.requires_grad and lin.bias.requires_grad, name
        assert conv.weight.grad is None and lin.bias.grad is None, name
        assert torch.equal(lin.weight.grad, torch.full_like(lin.weight, 0.25)), name
        for k, v in bn.state_dict().items():
            assert torch.equal(v, stats[k]), (name, k)


def test_eval_mode_and_frozen_inside_attack():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            seen.append((self.training, self.lin.weight.requires_grad, torch.is_grad_enabled()))
            return self.lin(x)

    model = Probe().train()
    x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
    with torch.no_grad():  # attacks still work when called under no_grad
        out = pgd(model, x, y, eps=0.1, alpha=0.05, steps=2)
    assert not torch.equal(out, x)
    assert seen and all(s == (False, False, True) for s in seen[1:])
    assert model.training and model.lin.weight.requires_grad


def test_state_restored_when_the_model_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("boom")
            return self.lin(x)

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, torch.rand(3, 4), torch.zeros(3, dtype=torch.long), eps=0.1, alpha=0.1,
            steps=2)
    assert model.training and model.lin.weight.requires_grad


def test_attack_mode_nests():
    model = bn_model().train()
    with attack_mode(model):
        with attack_mode(model):
            assert not model.training
        assert not model.training and not model[0].weight.requires_grad
    assert model.training and model[0].weight.requires_grad


# ---- gradient masking -------------------------------------------------------------------
class Flat(nn.Module):
    """Logits that do not depend on the input: the input gradient is exactly zero."""

    def __init__(self, c=3):
        super().__init__()
        self.b = nn.Parameter(torch.arange(c, dtype=torch.float32))

    def forward(self, x):
        return self.b.expand(x.shape[0], -1) + 0 * x.flatten(1)[:, :1]


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "apgd"])
def test_gradient_masking_warning(attack):
    x, y = torch.rand(4, 5), torch.zeros(4, dtype=torch.long)
    fn = {"fgsm": lambda m: fgsm(m, x, y, eps=0.1),
          "pgd": lambda m: pgd(m, x, y, eps=0.1, alpha=0.02, steps=2),
          "apgd": lambda m: apgd(m, x, y, eps=0.1, steps=2)}[attack]
    with pytest.warns(GradientMaskingWarning, match="zero or non-finite"):
        fn(Flat())
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMaskingWarning)
        fn(nn.Sequential(nn.Linear(5, 3)))  # a normal model: no warning


def test_gradient_masking_warning_non_finite():
    class NaNGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return self.lin(x) * torch.sqrt(x.sum(1, keepdim=True) * 0)  # d sqrt(0) = inf

    with pytest.warns(GradientMaskingWarning):
        fgsm(NaNGrad(), torch.rand(4, 5), torch.zeros(4, dtype=torch.long), eps=0.1)


# ---- bad input ---------------------------------------------------------------------------
class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


X, Y = torch.rand(3, 6), torch.tensor([0, 1, 3])
CASES = [
    (dict(eps=-0.1), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=-1.0), "alpha"),
    (dict(steps=-1), "steps"),
    (dict(norm="l1"), "unknown norm"),
    (dict(loss="hinge"), "unknown loss"),
    (dict(restarts=0), "restarts"),
    (dict(clip=(1.0, 0.0)), "clip"),
]


@pytest.mark.parametrize("kw,match", CASES)
def test_bad_config_raises_before_any_model_call(kw, match):
    model = Counting()
    base = dict(eps=0.1, alpha=0.02, steps=2)
    with pytest.raises(ValueError, match=match):
        pgd(model, X, Y, **{**base, **kw})
    if "alpha" not in kw:
        with pytest.raises(ValueError, match=match):
            apgd(model, X, Y, **{k: v for k, v in {**base, **kw}.items() if k != "alpha"})
    if "steps" not in kw and "restarts" not in kw:
        with pytest.raises(ValueError, match=match):
            fgsm(model, X, Y, **{k: v for k, v in {**base, **kw}.items() if k != "steps"})
    with pytest.raises(ValueError, match=match):
        PGD(model, **{**base, **kw})
    assert model.calls == 0


@pytest.mark.parametrize("x,y,match", [
    (X, torch.tensor([0, 1, 4]), "label 4 is out of range for a model with 4 outputs"),
    (X, torch.tensor([0, -1, 2]), "labels must be >= 0"),
    (torch.where(X > 0.5, torch.tensor(float("nan")), X), Y, "NaN"),
    (X, torch.tensor([0, 1]), "batch sizes differ"),
    (X * 2, Y, r"data range \[0, 1\], found \[0\.\d+, 1\.\d+\]"),
    (X - 1, Y, r"found \[-"),
    (X, Y.float(), "integer class labels"),
])
def test_bad_batch_raises(x, y, match):
    model = Counting()
    for fn in (lambda: pgd(model, x, y, eps=0.1, alpha=0.02, steps=2),
               lambda: fgsm(model, x, y, eps=0.1),
               lambda: apgd(model, x, y, eps=0.1, steps=2),
               lambda: FGSM(model, eps=0.1)(x, y)):
        with pytest.raises(ValueError, match=match):
            fn()
    assert model.calls <= 4  # at most the one label-range forward per attack; no steps
    with pytest.raises(ValueError, match="^fgsm: "):  # errors name the entry point called
        fgsm(model, x, y, eps=0.1)
    with pytest.raises(ValueError, match="^apgd: "):
        apgd(model, x, y, eps=0.1)


def test_dlr_needs_three_classes_and_callables_reject_unknown_options():
    model = nn.Sequential(nn.Linear(6, 2))
    with pytest.raises(ValueError, match=">= 3 outputs"):
        apgd(model, X, torch.tensor([0, 1, 1]), eps=0.1, steps=2, loss="dlr")
    with pytest.raises(TypeError, match="unknown option"):
        APGD(model, eps=0.1, alpha=0.1)
    with pytest.raises(TypeError, match="missing required"):
        PGD(model, eps=0.1)
    with pytest.raises(TypeError, match="nn.Module"):
        PGD(lambda x: x, eps=0.1, alpha=0.1, steps=1)


def test_custom_clip_range_is_respected():
    model = nn.Sequential(nn.Linear(6, 4))
    x = torch.rand(3, 6) * 2 - 1
    out = pgd(model, x, Y, eps=0.5, alpha=0.2, steps=3, clip=(-1.0, 1.0))
    assert float(out.min()) >= -1 and float(out.max()) <= 1
    with pytest.raises(ValueError, match="data range"):
        pgd(model, x, Y, eps=0.5, alpha=0.2, steps=3)


def test_attacks_under_inference_mode_say_they_need_autograd():
    model = bn_model().train()
    x, y = torch.rand(4, 1, 4, 4), torch.randint(0, 4, (4,))
    for fn in (lambda: pgd(model, x, y, eps=0.1, alpha=0.03, steps=2),
               lambda: fgsm(model, x, y, eps=0.1),
               lambda: apgd(model, x, y, eps=0.1, steps=2),
               lambda: PGD(model, eps=0.1, alpha=0.03, steps=2)(x, y),
               lambda: evaluate(model, [(x, y)], attacks=("pgd3",), eps=0.1)):
        with torch.inference_mode(), pytest.raises(RuntimeError, match="need autograd"):
            fn()
    assert model.training and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():  # no_grad is fine: the attack turns gradients back on
        assert pgd(model, x, y, eps=0.1, alpha=0.03, steps=2).shape == x.shape


def test_attack_reuses_masked_forms_across_its_forwards():
    """Inside an attack the weights are frozen for the op cache: the masked weight is built
    once per attack, not once per forward (the scope is ops._cache.frozen)."""
    import sparse_adv_fast as saf
    from sparse_adv_fast import backends
    from sparse_adv_fast.ops import _cache

    torch.manual_seed(0)
    lin = saf.nn.MaskedLinear(12, 5)
    lin.set_mask(torch.rand(5, 12) > 0.5)
    plain = nn.Linear(12, 5)
    model = nn.Sequential(nn.Flatten(), plain, nn.ReLU(), nn.Linear(5, 12), lin)
    x, y = torch.rand(6, 12), torch.randint(0, 5, (6,))
    with backends.using("torch"):
        _cache.stats.reset()
        pgd(model, x, y, eps=0.05, alpha=0.01, steps=5)
    assert _cache.stats.hits >= 5 and _cache.stats.builds <= 2, _cache.stats
