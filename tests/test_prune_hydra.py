"""HYDRA score-based pruning: exact counts, the zero-epoch rule, scores that learn, and the
TRADES score loss (one step checked against autograd of the objective through the STE)."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as tprune

import sparse_adv_fast as saf

pytestmark = pytest.mark.usefixtures("torch_backend")


def natural(model, x, y):
    return x


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4),
        nn.ReLU(), nn.Linear(4, 2),
    )


def _loader(n=24, batch=8):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 5, 5, generator=g)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


_LAYERS = ("0", "4", "6")


def test_zero_epochs_layer_scope_equals_magnitude():
    model = _net()
    ref = saf.prune.magnitude(copy.deepcopy(model), 0.6, scope="layer")
    out = saf.prune.hydra(model, 0.6, [], epochs=0, scope="layer")
    for k, m in saf.masks(out).items():
        assert torch.equal(m, saf.masks(ref)[k])


def test_zero_epochs_global_prunes_layer_normalised_magnitude():
    model = _net()
    ref = copy.deepcopy(model)
    scores = {}
    for n in _LAYERS:
        w = ref.get_submodule(n).weight.detach()
        fan_in = w[0].numel()
        scores[(ref.get_submodule(n), "weight")] = math.sqrt(6 / fan_in) * w.abs() / w.abs().max()
    tprune.global_unstructured(list(scores), pruning_method=tprune.L1Unstructured, amount=0.7,
                               importance_scores=scores)
    out = saf.prune.hydra(model, 0.7, [], epochs=0)
    for n in _LAYERS:
        assert torch.equal(saf.masks(out)[n], ref.get_submodule(n).weight_mask.bool()), n


def _assert_exact_sparsity_and_frozen_rest(model, masks, before, scope, sparsity):
    """The pruned count is exact; weights are the old ones times the mask, biases and the
    unmasked layer untouched, and every parameter trainable again."""
    if scope == "global":
        n = sum(m.numel() for m in masks.values())
        assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * n)
    else:
        for m in masks.values():
            assert int((~m).sum()) == round(sparsity * m.numel())
    for n in _LAYERS:
        layer = model.get_submodule(n)
        assert torch.equal(layer.weight, before[f"{n}.weight"] * masks[n])
        assert torch.equal(layer.bias, before[f"{n}.bias"])
    assert torch.equal(model[1].weight, before["1.weight"])
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_training_reaches_sparsity_exactly_and_freezes_everything_else(scope):
    model = _net()
    before = {k: v.clone() for k, v in saf.sparsify(model).state_dict().items()}
    model.eval()
    out = saf.prune.hydra(model, 0.55, _loader(), epochs=2, lr=0.5, attack=natural, scope=scope)
    assert out is model and not model.training
    masks = saf.masks(model)
    _assert_exact_sparsity_and_frozen_rest(model, masks, before, scope, 0.55)


def test_attack_sees_the_current_masked_network():
    model = _net()
    seen = []

    def atk(m, x, y):
        w = torch.cat([m.get_submodule(n).weight.flatten() for n in _LAYERS])
        seen.append(int((w == 0).sum()))
        return x

    saf.prune.hydra(model, 0.5, _loader(), epochs=1, attack=atk)
    n = sum(model.get_submodule(k).weight.numel() for k in _LAYERS)
    assert seen == [round(0.5 * n)] * 3


def test_scores_learn_that_a_small_weight_matters():
    # feature 0 decides the label but has tiny weights; feature 1 is noise with big weights
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=g)
    x = torch.stack([(2 * y - 1).float(), torch.randn(256, generator=g)], 1)
    loader = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-0.05, 1.0], [0.05, -0.9]]))
    magnitude_keep = saf.masks(saf.prune.magnitude(copy.deepcopy(model), 0.5))[""]
    assert torch.equal(magnitude_keep[:, 1], torch.tensor([True, True]))
    out = saf.prune.hydra(model, 0.5, loader, epochs=5, lr=0.1, attack=natural)
    assert torch.equal(out.weight_mask, torch.tensor([[True, False], [True, False]]))
    assert torch.equal(out.weight, torch.tensor([[-0.05, 0.0], [0.05, 0.0]]))


def test_already_pruned_weights_stay_pruned():
    model = saf.prune.random(_net(), 0.3, generator=torch.Generator().manual_seed(0))
    first = saf.masks(model)
    saf.prune.hydra(model, 0.6, _loader(), epochs=1, lr=1.0, attack=natural)
    for k, m in saf.masks(model).items():
        assert not torch.any(m & ~first[k])
    with pytest.raises(ValueError, match="never revived"):
        saf.prune.hydra(model, 0.2, _loader(), epochs=1, attack=natural)


def test_default_attack_is_saf_pgd_with_given_settings(monkeypatch):
    import sparse_adv_fast.attacks as attacks

    calls = []

    def fake_pgd(model, x, y, **kw):
        calls.append(kw)
        return x

    monkeypatch.setattr(attacks, "pgd", fake_pgd, raising=False)
    saf.prune.hydra(_net(), 0.5, _loader(), epochs=1, eps=0.1, alpha=0.02, steps=3)
    assert calls == [{"eps": 0.1, "alpha": 0.02, "steps": 3}] * 3


def test_failure_during_training_leaves_model_as_it_was():
    model = saf.sparsify(_net())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(m, x, y):
        raise RuntimeError("attack failed")

    with pytest.raises(RuntimeError, match="attack failed"):
        saf.prune.hydra(model, 0.5, _loader(), epochs=1, attack=boom)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"sparsity": 1.0}, ValueError, "sparsity"),
        ({"scope": "x"}, ValueError, "scope"),
        ({"epochs": -1}, ValueError, "epochs"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"attack": 3}, TypeError, "attack"),
        ({"loss": "foo"}, ValueError,
         r"^hydra: unknown loss 'foo'; choose one of \('pgd', 'trades'\)$"),
        ({"loss": "trades", "attack": natural}, ValueError, "attack= is the hook of loss='pgd'"),
        ({"beta": -1.0}, ValueError, "beta must be a finite number >= 0"),
        ({"beta": float("nan")}, ValueError, "beta"),
        ({"beta": True}, ValueError, "beta"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    model = _net()
    args = {"sparsity": 0.5, **kwargs}
    with pytest.raises(exc, match=match):
        saf.prune.hydra(model, args.pop("sparsity"), _loader(), **args)
    assert not saf.nn.masked_layers(model)


# ---- loss="trades" --------------------------------------------------------------------------
HYDRA_MODULE = importlib.import_module("sparse_adv_fast.prune.hydra")


def _kl_attack_by_hand(f, x, *, eps, alpha, steps):
    """The TRADES inner attack written out: start at x + 0.001 randn, then signed-gradient
    ascent on KL(f(x) || f(x_adv)) projected onto the linf eps-ball and [0, 1]."""
    with torch.no_grad():
        p = F.softmax(f(x), 1)
    xa = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    for _ in range(steps):
        xa = xa.detach().requires_grad_(True)
        q = F.log_softmax(f(xa), 1)
        kl = (p * (p.log() - q)).sum()
        (g,) = torch.autograd.grad(kl, xa)
        xa = torch.min(torch.max(xa + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return xa.detach()


def _prune_lowest_half(score: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(score.numel(), dtype=torch.bool)
    keep[score.flatten().argsort()[: round(0.5 * score.numel())]] = False
    return keep.view_as(score)


def test_trades_score_step_equals_autograd_of_the_trades_objective(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.rand(8, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    ref = copy.deepcopy(model)
    lr, beta, eps, alpha, steps = 0.5, 2.5, 0.2, 0.05, 3

    seen = []  # every |s| the masks are selected from: init, before the step, after it
    real_select = HYDRA_MODULE.select

    def spy(scores, *args):
        seen.append({n: t.detach().clone() for n, t in scores.items()})
        return real_select(scores, *args)

    monkeypatch.setattr(HYDRA_MODULE, "select", spy)
    torch.manual_seed(7)
    out = saf.prune.hydra(model, 0.5, [(x, y)], epochs=1, lr=lr, momentum=0.9, eps=eps,
                          alpha=alpha, steps=steps, scope="layer", loss="trades", beta=beta)

    # The oracle, by hand: HYDRA's init, the layer-wise top half, the KL attack on the masked
    # network, then the TRADES objective through the STE w * (mask + |s| - sg(|s|)).
    names = ("0", "2")
    w = {n: ref.get_submodule(n).weight.detach() for n in names}
    b = {n: ref.get_submodule(n).bias.detach() for n in names}
    s0 = {n: math.sqrt(6 / w[n].shape[1]) * w[n] / w[n].abs().max() for n in names}
    mask0 = {n: _prune_lowest_half(s0[n].abs()) for n in names}
    assert len(seen) == 3
    for n in names:
        assert torch.allclose(seen[0][n], s0[n].abs()) and torch.equal(seen[1][n], seen[0][n])

    def net(inp, weights):
        return F.linear(F.relu(F.linear(inp, weights["0"], b["0"])), weights["2"], b["2"])

    torch.manual_seed(7)
    x_adv = _kl_attack_by_hand(lambda i: net(i, {n: w[n] * mask0[n] for n in names}), x,
                               eps=eps, alpha=alpha, steps=steps)
    assert (x_adv - x).abs().max() > 0.1  # the attack moved: the KL term is not ~0

    def stepped(objective):
        s = {n: s0[n].clone().requires_grad_(True) for n in names}
        w_eff = {n: w[n] * (mask0[n].float() + s[n].abs() - s[n].abs().detach()) for n in names}
        grads = torch.autograd.grad(objective(w_eff), [s[n] for n in names])
        # the first SGD step: the momentum buffer is the gradient, the rate is lr
        return {n: (s0[n] - lr * g).abs() for n, g in zip(names, grads, strict=True)}

    def trades(w_eff):
        clean, adv = net(x, w_eff), net(x_adv, w_eff)
        p = F.softmax(clean, 1)
        kl = (p * (F.log_softmax(clean, 1) - F.log_softmax(adv, 1))).sum(1).mean()
        return F.cross_entropy(clean, y) + beta * kl

    want = stepped(trades)
    pgd_like = stepped(lambda w_eff: F.cross_entropy(net(x_adv, w_eff), y))
    for n in names:
        assert (want[n] - s0[n].abs()).abs().max() > 1e-3  # the step moved the scores
        assert torch.allclose(seen[2][n], want[n], rtol=1e-5, atol=1e-6), n
        assert not torch.allclose(seen[2][n], pgd_like[n], rtol=1e-3, atol=1e-4), n
        assert torch.equal(saf.masks(out)[n], _prune_lowest_half(want[n])), n
        assert torch.equal(out.get_submodule(n).weight, w[n] * _prune_lowest_half(want[n]))


def test_trades_uses_the_trades_helpers_with_the_given_settings(monkeypatch):
    import sparse_adv_fast.attacks as attacks
    import sparse_adv_fast.train.trades as T

    attacks_seen, betas = [], []
    real_loss = T.trades_loss

    def fake_attack(model, x, **kw):
        attacks_seen.append(kw)
        return x

    def loss_spy(model, x, y, x_adv, beta):
        betas.append(beta)
        return real_loss(model, x, y, x_adv, beta)

    def no_pgd(*a, **k):
        raise AssertionError("loss='trades' must not run PGD")

    monkeypatch.setattr(T, "trades_attack", fake_attack)
    monkeypatch.setattr(T, "trades_loss", loss_spy)
    monkeypatch.setattr(attacks, "pgd", no_pgd, raising=False)
    saf.prune.hydra(_net(), 0.5, _loader(), epochs=1, eps=0.1, alpha=0.02, steps=3,
                    loss="trades", beta=4.0)
    assert attacks_seen == [{"eps": 0.1, "alpha": 0.02, "steps": 3}] * 3
    assert betas == [4.0] * 3
    betas.clear()
    saf.prune.hydra(_net(), 0.5, _loader(), epochs=1, loss="trades")
    assert betas == [6.0] * 3  # TRADES' usual weight by default


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_trades_training_reaches_sparsity_exactly(scope):
    model = _net()
    before = {k: v.clone() for k, v in saf.sparsify(model).state_dict().items()}
    out = saf.prune.hydra(model, 0.55, _loader(), epochs=2, lr=0.5, eps=0.1, alpha=0.05,
                          steps=2, scope=scope, loss="trades")
    masks = saf.masks(out)
    _assert_exact_sparsity_and_frozen_rest(model, masks, before, scope, 0.55)


def test_trades_failure_during_training_leaves_model_as_it_was(monkeypatch):
    import sparse_adv_fast.train.trades as T

    model = saf.sparsify(_net())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(model, x, **kw):
        raise RuntimeError("kl attack failed")

    monkeypatch.setattr(T, "trades_attack", boom)
    with pytest.raises(RuntimeError, match="kl attack failed"):
        saf.prune.hydra(model, 0.5, _loader(), epochs=1, loss="trades")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("train_method, loss", [("trades", "trades"), ("pgd", "pgd"),
                                                ("natural", "pgd"), ("fgsm_rs", "pgd")])
def test_prune_command_scores_train_on_the_fine_tuning_loss(monkeypatch, train_method, loss):
    # `prune --method hydra --train-method trades`: the scores train on TRADES (with the
    # fine-tuning's beta), as in HYDRA, where both phases share one loss; otherwise on PGD.
    from sparse_adv_fast.pipeline import commands, modelio

    class Runner:  # a stage runner that runs the stage and keeps nothing
        out_dir = "run"

        def run(self, name, fn):
            return fn()

    calls = []
    monkeypatch.setattr(saf.prune, "hydra", lambda net, sp, loader, **kw: calls.append(kw) or net)
    arch = modelio.arch_spec("mlp", "digits", 1)
    commands._hydra(modelio.build(arch), arch, Runner(), (_loader(), None), sparsity=0.5,
                    scope="layer", epochs=1, eps=0.1, steps=2, seed=0, progress=False,
                    train_method=train_method, beta=3.0)
    assert [(kw["loss"], kw["beta"]) for kw in calls] == [(loss, 3.0)]
