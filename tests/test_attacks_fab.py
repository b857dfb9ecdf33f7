"""FAB-T: the box-constrained hyperplane projection against a linear program, the minimal
L∞ / L2 perturbation of a linear model against its closed form, and robust accuracy
against torchattacks' FAB (multi-targeted) on a small trained model."""

from __future__ import annotations

import pytest
import torch
from conftest import blob_mlp
from torch import nn

from sparse_adv_fast.attacks import FAB, fab
from sparse_adv_fast.attacks.fab import project_hyperplane_box

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_is_the_exact_constrained_minimum(norm):
    import scipy.optimize as scipy_opt
    torch.manual_seed(0)
    n, d = 12, 7
    p = torch.rand(n, d, dtype=torch.float64)
    w = torch.randn(n, d, dtype=torch.float64)
    w[0, :3] = 0.0  # zero weights must not move
    b = (w * torch.rand(n, d, dtype=torch.float64)).sum(1)  # a box point lies on the plane
    dd = project_hyperplane_box(p, w, b, norm=norm)
    assert torch.allclose((w * (p + dd)).sum(1), b, atol=1e-9)
    assert bool(((p + dd) >= -1e-12).all() and ((p + dd) <= 1 + 1e-12).all())
    assert bool((dd[0, :3] == 0).all())
    for i in range(n):
        if norm == "linf":  # LP: min t  s.t.  -t <= d_j <= t, <w, d> = c, box
            c = float(b[i] - w[i] @ p[i])
            cost = [0.0] * d + [1.0]
            a_ub = [[(1.0 if j == k else 0.0) for j in range(d)] + [-1.0] for k in range(d)]
            a_ub += [[(-1.0 if j == k else 0.0) for j in range(d)] + [-1.0] for k in range(d)]
            bounds = [(-float(p[i, j]), 1 - float(p[i, j])) for j in range(d)] + [(0, None)]
            res = scipy_opt.linprog(cost, A_ub=a_ub, b_ub=[0.0] * (2 * d),
                                    A_eq=[w[i].tolist() + [0.0]], b_eq=[c], bounds=bounds)
            assert res.status == 0
            assert float(dd[i].abs().max()) == pytest.approx(res.fun, abs=1e-7)
        else:  # the L2 minimiser satisfies the KKT form d = clip(lambda w, box)
            room_lo, room_hi = -p[i], 1 - p[i]
            lam_fit = scipy_opt.brentq(
                lambda t, i=i, lo=room_lo, hi=room_hi: float((w[i] * (t * w[i]).clamp(lo, hi)).sum()
                                     - (b[i] - w[i] @ p[i])), -1e3, 1e3)
            assert torch.allclose(dd[i], (lam_fit * w[i]).clamp(room_lo, room_hi), atol=1e-8)


def _linear_multiclass():
    torch.manual_seed(1)
    model = nn.Linear(8, 4).double()
    return model


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_minimal_perturbation_of_a_linear_model(norm):
    """Without box effects the minimal perturbation of a linear classifier is
    min_j (f_y - f_j) / ||w_y - w_j||_* (dual norm); FAB must find it."""
    model = _linear_multiclass()
    x = 0.4 + 0.2 * torch.rand(10, 8, dtype=torch.float64)
    with torch.no_grad():
        model.weight.mul_(3.0)
        y = model(x).argmax(1)
        z = model(x)
    w = model.weight.detach()
    dual = 1 if norm == "linf" else 2
    exact = torch.stack([
        min((z[i, y[i]] - z[i, j]) / (w[y[i]] - w[j]).norm(p=dual)
            for j in range(4) if j != y[i]) for i in range(10)])
    # x in [0.4, 0.6] and no coordinate moves by more than the radius: no box effect.
    assert float(exact.max()) < 0.4
    x_adv = fab(model, x, y, norm=norm, n_target_classes=3)
    d = (x_adv - x)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    with torch.no_grad():
        assert bool((model(x_adv).argmax(1) != y).all())
    assert bool((size >= exact * (1 - 1e-9)).all())  # nothing beats the optimum
    # Every accepted iterate overshoots the boundary by eta = 1.05 at most (5 %); the
    # beta = 0.9 backward steps shrink that to about 0.5 % in 100 iterations.
    assert torch.allclose(size, exact, rtol=1e-2)


def test_eps_mode_returns_only_points_inside_the_ball_and_targets_are_top_classes():
    model = _linear_multiclass().float()
    x = 0.4 + 0.2 * torch.rand(16, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    free = fab(model, x, y)
    size = (free - x).abs().flatten(1).amax(1)
    eps = float(size.median())
    got = fab(model, x, y, eps=eps)
    gsize = (got - x).abs().flatten(1).amax(1)
    with torch.no_grad():
        fooled = model(got).argmax(1) != y
    assert bool((gsize[fooled] <= eps + 1e-6).all())
    assert bool((gsize[~fooled] == 0).all())
    assert int(fooled.sum()) >= int((size <= eps).sum()) - 1
    # One target = the runner-up only: never smaller than using all three targets.
    one = (fab(model, x, y, n_target_classes=1) - x).abs().flatten(1).amax(1)
    assert bool((one >= size - 1e-6).all())
    assert torch.equal(FAB(model, eps=eps)(x, y), fab(model, x, y, eps=eps))
    with pytest.raises(ValueError, match="need eps"):
        fab(model, x, y, restarts=2)


def test_robust_accuracy_agrees_with_torchattacks_fab():
    import torchattacks  # the peer oracle (dev extra)
    model, x, y = blob_mlp(5, 20, 150, noise=0.1, steps=60)
    eps = 0.06
    ours = fab(model, x, y, eps=eps)
    ta = torchattacks.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1,
                          multi_targeted=True, n_classes=5, seed=0)
    # torchattacks wants image-shaped inputs; a [B, D] batch works through the same ops.
    theirs = ta(x, y)
    with torch.no_grad():
        acc_ours = (model(ours).argmax(1) == y).float().mean().item()
        acc_theirs = (model(theirs).argmax(1) == y).float().mean().item()
    assert float((ours - x).abs().max()) <= eps + 1e-6
    assert 0.1 < acc_theirs < 0.9
    # Same algorithm, same start (x itself): only float ties can differ; 2 of 150 samples.
    assert abs(acc_ours - acc_theirs) <= 2 / 150 + 1e-9
