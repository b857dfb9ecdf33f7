"""robustness_report against closed forms on linear models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import blob_mlp
from torch import nn

import sparse_adv_fast as saf
from sparse_adv_fast.metrics import margins, robustness_report

pytestmark = pytest.mark.usefixtures("one_thread", "torch_backend")


def _linear(w, b) -> nn.Linear:
    m = nn.Linear(len(w[0]), len(w)).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor(w, dtype=torch.float64))
        m.bias.copy_(torch.tensor(b, dtype=torch.float64))
    return m


def test_hand_computed_binary_linear_model():
    # f(x) = W x + b; W0 - W1 = [1, -3, 1], b0 - b1 = 0.3
    model = _linear([[1.0, -2.0, 0.5], [0.0, 1.0, -0.5]], [0.1, -0.2])
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    # margins: class 0 on x0: 1 + 1 + 0.3 = 2.3; class 1 on x1: -(-3 + 0.3) = 2.7;
    # class 0 on x2: 0.5 - 1.5 + 0.5 + 0.3 = -0.2 (misclassified)
    r = robustness_report(model, x, y, norm="linf", eps=0.5)
    assert r["clean_accuracy"] == pytest.approx(2 / 3)
    assert r["mean_margin"] == pytest.approx((2.3 + 2.7 - 0.2) / 3)
    assert r["mean_input_grad_norm"] == pytest.approx(5.0)  # ||[1, -3, 1]||_1
    radii = [2.3 / 5, 2.7 / 5]
    assert r["first_order_radius"]["mean"] == pytest.approx(sum(radii) / 2)
    assert r["first_order_radius"]["median"] == pytest.approx(min(radii))  # lower middle
    # radii 0.46, 0.54 and 0 (misclassified) over all three samples
    assert r["certified_fraction_at_eps"] == pytest.approx(1 / 3)
    for eps, frac in ((0.4, 2 / 3), (0.6, 0.0), (0.0, 1.0)):
        got = robustness_report(model, x, y, eps=eps)["certified_fraction_at_eps"]
        assert got == pytest.approx(frac), eps
    r2 = robustness_report(model, x, y, norm="l2", eps=0.7)
    l2 = math.sqrt(11.0)
    assert r2["mean_input_grad_norm"] == pytest.approx(l2)
    assert r2["first_order_radius"]["mean"] == pytest.approx((2.3 + 2.7) / 2 / l2)
    assert r2["certified_fraction_at_eps"] == pytest.approx(1 / 3)  # 0.693 < 0.7 < 0.814


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_first_order_radius_is_the_true_distance_for_a_binary_linear_model(norm):
    torch.manual_seed(1)
    model = nn.Linear(6, 2).double()
    x = torch.rand(16, 6, dtype=torch.float64)
    y = model(x).argmax(1)  # all correct
    r = robustness_report(model, x, y, norm=norm)
    g = model.weight[0] - model.weight[1]
    sign = torch.where(y == 0, 1.0, -1.0).double()[:, None]
    direction = -sign * (g.sign() if norm == "linf" else g / g.norm())  # toward the boundary
    dual = g.abs().sum() if norm == "linf" else g.norm()
    m = margins(model(x), y).detach()
    radius = (m / dual).detach()
    assert r["first_order_radius"]["mean"] == pytest.approx(float(radius.mean()))
    with torch.no_grad():
        inside = model(x + direction * radius[:, None] * (1 - 1e-6)).argmax(1)
        beyond = model(x + direction * radius[:, None] * (1 + 1e-6)).argmax(1)
    assert torch.equal(inside, y) and torch.equal(beyond, 1 - y)


def test_multiclass_margin_uses_the_runner_up():
    model = _linear([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], [0.0, 0.0, 0.5])
    x = torch.tensor([[1.0, 0.2]], dtype=torch.float64)  # logits 1, 0.4, 0.5 -> runner-up 2
    r = robustness_report(model, x, torch.tensor([0]))
    assert r["mean_margin"] == pytest.approx(0.5)
    assert r["mean_input_grad_norm"] == pytest.approx(1.0)  # W0 - W2 = [1, 0]


def test_sparsity_weight_norms_robust_accuracy_and_state_restored():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 0, -2], [0, 0, 0, 0], [0, 3, 0, 0]]))
        model[2].weight.copy_(torch.tensor([[0.0, 1, -1], [2, 0, 0]]))
    model = saf.sparsify(model)
    model.train()
    model[2].bias.requires_grad_(False)
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 0, 1, 1])
    seen = {}

    def atk(xx, yy):
        seen["n"] = len(xx)
        return torch.zeros_like(xx)

    r = robustness_report(model, x, y, attack=atk)
    assert r["sparsity"] == pytest.approx(12 / 18)
    assert r["layer_sparsity"] == pytest.approx({"0": 9 / 12, "2": 3 / 6})
    wn = r["weight_norms"]
    assert wn["layers"]["0"] == pytest.approx({"l1": 6.0, "l2": math.sqrt(14)})
    assert wn["layers"]["2"] == pytest.approx({"l1": 4.0, "l2": math.sqrt(6)})
    assert wn["product_l1"] == pytest.approx(24.0)
    assert wn["product_l2"] == pytest.approx(math.sqrt(84))
    with torch.no_grad():
        expected = float((model.eval()(torch.zeros_like(x)).argmax(1) == y).float().mean())
    model.train()
    assert seen["n"] == 5 and r["robust_accuracy"] == pytest.approx(expected)
    assert "certified_fraction_at_eps" not in r
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]


def test_eval_mode_is_used_for_batchnorm():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[1].running_mean.fill_(5.0)
    x, y = torch.rand(4, 3), torch.tensor([0, 1, 1, 0])
    r = robustness_report(model, x, y)
    model.eval()
    with torch.no_grad():
        m = margins(model(x), y)
    assert r["mean_margin"] == pytest.approx(float(m.mean()), abs=1e-6)
    assert torch.equal(model[1].running_mean, torch.full((3,), 5.0))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"norm": "l1"}, ValueError, "norm"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"attack": 1}, TypeError, "attack"),
        ({"y": torch.zeros(3, dtype=torch.long)}, ValueError, "same number"),
        ({"y": torch.zeros(4)}, TypeError, "integer"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    model = nn.Linear(3, 2)
    args = {"y": torch.zeros(4, dtype=torch.long), **kwargs}
    with pytest.raises(exc, match=match):
        robustness_report(model, torch.rand(4, 3), args.pop("y"), **args)


# ---- first-order radius over all classes (Hein & Andriushchenko 2017) ---------------------
def test_radius_takes_the_nearest_class_boundary_not_the_runner_up():
    # logits on x = [1, 0.2]: class 0 -> 1.0, class 1 -> 0.9 (runner-up, far in gradient
    # terms), class 2 -> 0.8 with a large gradient difference.
    #   j = 1: (1.0 - 0.9) / ||[1, 0] - [0, 4.5]||_1 = 0.1 / 5.5 = 0.01818
    #   j = 2: (1.0 - 0.8) / ||[1, 0] - [0, -20]||_1 = 0.2 / 21 = 0.00952  <- the minimum
    model = _linear([[1.0, 0.0], [0.0, 4.5], [0.0, -20.0]], [0.0, 0.0, 4.8])
    x = torch.tensor([[1.0, 0.2]], dtype=torch.float64)
    y = torch.tensor([0])
    assert model(x)[0].tolist() == pytest.approx([1.0, 0.9, 0.8])
    r = saf.metrics.first_order_radii(model, x, y)
    assert float(r) == pytest.approx(0.2 / 21)
    rep = robustness_report(model, x, y)
    assert rep["first_order_radius"]["mean"] == pytest.approx(0.2 / 21)
    assert rep["mean_margin"] == pytest.approx(0.1)  # the margin is still the runner-up's
    # Exact for a linear model: just inside the radius nothing flips; just beyond, class 2
    # wins (step along sign(w_2 - w_0) = [-1, -1]).
    d = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    with torch.no_grad():
        assert model(x + d * float(r) * (1 - 1e-6)).argmax(1).item() == 0
        assert model(x + d * float(r) * (1 + 1e-6)).argmax(1).item() == 2
    l2 = saf.metrics.first_order_radii(model, x, y, norm="l2")
    assert float(l2) == pytest.approx(min(0.1 / (1 + 4.5 ** 2) ** 0.5, 0.2 / (1 + 400) ** 0.5))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_radius_equals_the_minimal_perturbation_of_a_linear_model(norm):
    torch.manual_seed(0)
    model = nn.Linear(8, 5).double()
    with torch.no_grad():  # class boundaries pass near the centre of the box
        model.bias.copy_(-model.weight.sum(1) * 0.5 + 0.1 * torch.randn(5).double())
    x = 0.45 + 0.1 * torch.rand(12, 8, dtype=torch.float64)
    y = model(x).argmax(1)
    res = saf.metrics.radius_vs_minimal_perturbation(model, x, y, norm=norm)
    assert res["n"] == 12
    r, m = torch.tensor(res["radius"]), torch.tensor(res["minimal"])
    assert float(r.max()) < 0.4  # no box effect, so the radius is the exact optimum
    assert bool((m >= r * (1 - 1e-9)).all())  # FAB cannot beat the exact optimum
    assert torch.allclose(m, r, rtol=1e-2)  # and finds it, to FAB's overshoot
    assert res["pearson"] > 0.99 and res["spearman"] > 0.95


def test_radius_correlates_with_fab_on_a_nonlinear_model():
    model, x, y = blob_mlp(4, 10, 80, noise=0.15, steps=80, act=nn.Tanh)
    res = saf.metrics.radius_vs_minimal_perturbation(model, x[:40], y[:40], steps=50)
    assert res["n"] >= 30 and len(res["radius"]) == len(res["minimal"]) == res["n"]
    assert res["spearman"] > 0.6 and res["pearson"] > 0.6
    # A first-order estimate, not a bound, but on a smooth model it is the right scale.
    assert 0.5 < res["mean_ratio"] < 2.0


def test_mixed_train_eval_modes_are_restored_exactly():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(),
                          nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.2)), nn.Linear(8, 3))
    model.train()
    model[1].eval()  # frozen BN statistics, the rest training
    model[4][1].eval()
    model[5].weight.requires_grad_(False)
    before = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    seen = {}

    def atk(xx, yy):
        seen["modes"] = [m.training for m in model.modules()]
        return xx

    robustness_report(model, x, y, eps=0.1, attack=atk)
    assert [m.training for m in model.modules()] == before
    assert [p.requires_grad for p in model.parameters()] == flags
    assert seen["modes"] == before  # the caller's attack sees the model as the caller left it
    saf.metrics.first_order_radii(model, x, y)
    assert [m.training for m in model.modules()] == before
