"""Training methods: the attack each one calls, train/eval modes, TRADES against a
hand-computed step and loss, and one short fit per method."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_adv_fast as saf
from sparse_adv_fast import data, models
from sparse_adv_fast.train import fit, methods
from sparse_adv_fast.train.trades import trades_attack, trades_loss


class _Recorder(nn.Module):
    """Wraps a model and records (training, any param requires_grad) at each forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.calls.append((self.training, any(p.requires_grad for p in self.parameters())))
        return self.inner(x)


def _batch(n=8):
    torch.manual_seed(0)
    return torch.rand(n, 1, 8, 8), torch.randint(0, 10, (n,))


def _model():
    torch.manual_seed(0)
    return models.small_cnn(width=0.5)


def test_natural_is_cross_entropy():
    model = _model().train()
    x, y = _batch()
    cfg = methods.MethodConfig(eps=0.1, alpha=0.025, steps=1)
    loss, logits = methods.natural(model, x, y, cfg)
    assert torch.allclose(loss, F.cross_entropy(model(x), y))
    assert torch.equal(logits, model(x))


@pytest.mark.parametrize("method, attack, alpha", [
    ("pgd", "pgd", 0.25), ("fgsm_rs", "fgsm", 1.25),
])
def test_attack_arguments_and_default_alpha(monkeypatch, method, attack, alpha):
    seen = {}
    real = getattr(saf.attacks, attack)

    def spy(model, x, y, **kw):
        seen.update(kw)
        return real(model, x, y, **kw)

    monkeypatch.setattr(saf.attacks, attack, spy)
    tr, _ = data.loaders("digits", batch_size=8, train_subset=8)
    fit(_model(), (tr, None), method, epochs=1, eps=0.1, steps=3, progress=False)
    assert seen["eps"] == 0.1 and seen["alpha"] == pytest.approx(alpha * 0.1)
    assert seen["random_start"] is True and seen["norm"] == "linf"
    if method == "pgd":
        assert seen["steps"] == 3
    seen.clear()
    fit(_model(), (tr, None), method, epochs=1, eps=0.1, alpha=0.05, progress=False)
    assert seen["alpha"] == 0.05


@pytest.mark.parametrize("method", ["pgd", "fgsm_rs", "trades"])
def test_attack_in_eval_mode_loss_in_train_mode(method):
    model = _Recorder(_model()).train()
    x, y = _batch()
    cfg = methods.MethodConfig(eps=0.1, alpha=0.025, steps=2)
    loss, _ = methods.METHODS[method](model, x, y, cfg)
    attack_calls = [c for c in model.calls if not c[0]]
    loss_calls = [c for c in model.calls if c[0]]
    assert attack_calls and all(not req for _, req in attack_calls)  # frozen params
    assert loss_calls == [(True, True)] * (2 if method == "trades" else 1)
    assert model.calls[-len(loss_calls):] == loss_calls  # loss forwards come last
    assert model.training and all(p.requires_grad for p in model.parameters())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_trades_attack_matches_hand_computed_step():
    model = _model().eval()
    x, _ = _batch()
    eps, alpha = 0.1, 0.03
    torch.manual_seed(1)
    x_adv = trades_attack(model, x, eps=eps, alpha=alpha, steps=1)
    torch.manual_seed(1)
    x0 = (x + 0.001 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
    kl = (p * (p.log() - F.log_softmax(model(x0), 1))).sum()
    (g,) = torch.autograd.grad(kl, x0)
    ref = torch.minimum(torch.maximum(x0.detach() + alpha * g.sign(), x - eps), x + eps)
    ref = ref.clamp(0, 1)
    torch.testing.assert_close(x_adv, ref, rtol=0, atol=1e-6)


def test_trades_attack_stays_in_ball_raises_kl_and_restores_model():
    model = _model().train()
    model[1].weight.requires_grad_(False)  # a user-frozen parameter stays frozen
    x, _ = _batch(16)
    eps = 0.1
    torch.manual_seed(2)
    x_adv = trades_attack(model, x, eps=eps, alpha=eps / 4, steps=5)
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    assert model.training and not model[1].weight.requires_grad
    assert model[3].weight.requires_grad
    model.eval()
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        noise = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        kl_adv = F.kl_div(F.log_softmax(model(x_adv), 1), p, reduction="sum")
        kl_start = F.kl_div(F.log_softmax(model(noise), 1), p, reduction="sum")
    assert float(kl_adv) > 10 * float(kl_start)
    x_l2 = trades_attack(model, x, eps=0.5, alpha=0.2, steps=3, norm="l2")
    assert float((x_l2 - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5


def test_trades_loss_formula():
    model = _model().train()
    x, y = _batch()
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    beta = 6.0
    loss, logits_adv = trades_loss(model, x, y, x_adv, beta)
    lc, la = model(x), model(x_adv)
    pc = F.softmax(lc, 1)
    kl = (pc * (F.log_softmax(lc, 1) - F.log_softmax(la, 1))).sum(1).mean()
    expected = -F.log_softmax(lc, 1).gather(1, y[:, None]).mean() + beta * kl
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(logits_adv, la)


@pytest.mark.parametrize("method", ["natural", "pgd", "trades", "fgsm_rs"])
def test_each_method_trains(method):
    torch.manual_seed(0)
    model = models.build("small_cnn", "digits", width=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    tr, te = data.loaders("digits", batch_size=16, train_subset=32, test_subset=16)
    h = fit(model, (tr, te), method, epochs=1, steps=2, progress=False, val_batches=1,
            val_steps=2)
    assert math.isfinite(h.train_loss[0]) and h.iterations == 2
    assert h.val_pgd_acc[0] <= 1 and h.val_clean_acc[0] <= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_evaluate_is_the_attacks_evaluate():
    ev = importlib.import_module("sparse_adv_fast.attacks.evaluate").evaluate
    assert saf.train.evaluate is ev
    from sparse_adv_fast.train import evaluate

    assert evaluate is ev
