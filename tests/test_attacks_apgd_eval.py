"""APGD (schedule, closed form, strength vs PGD), the losses on hand-computed logits, and
evaluate (per-attack, worst case = per-sample AND)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_adv_fast.attacks import APGD, FGSM, PGD, apgd, evaluate, losses, pgd
from sparse_adv_fast.attacks.apgd import checkpoints
from tests.test_attacks_pgd import binary_linear
from tests.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def trained():
    """A tiny MLP trained for a few full-batch steps on 4 Gaussian blobs in [0, 1]^10."""
    torch.manual_seed(0)
    c, d, n = 4, 10, 128
    centers = torch.rand(c, d)
    y = torch.randint(0, c, (n,))
    x = (centers[y] + 0.15 * torch.randn(n, d)).clamp(0, 1)
    model = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, c))
    opt = torch.optim.Adam(model.parameters(), 5e-2)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# ---- losses, hand-computed ---------------------------------------------------------------
def test_losses_hand_computed():
    z = torch.tensor([[3.0, 1.0, 2.0, -1.0]])
    y, t = torch.tensor([0]), torch.tensor([1])
    # CW: max_{j!=0} z_j - z_0 = 2 - 3; targeted: z_1 - max_{j!=1} z_j = 1 - 3.
    assert losses.cw(z, y).item() == -1.0
    assert losses.cw_targeted(z, t).item() == -2.0
    # DLR: -(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3) = -(3 - 2) / (3 - 1).
    assert losses.dlr(z, y).item() == pytest.approx(-0.5)
    assert losses.dlr(z, torch.tensor([2])).item() == pytest.approx(-(2 - 3) / 2)
    # Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(3 - 1) / (3 - 0).
    assert losses.dlr_targeted(z, y, t).item() == pytest.approx(-2 / 3)
    ce = -torch.log_softmax(z, 1)[0, 0]
    assert losses.ce(z, y).item() == pytest.approx(ce.item())
    assert losses.ce_targeted(z, t).item() == pytest.approx(torch.log_softmax(z, 1)[0, 1].item())
    # DLR is invariant to shifting and scaling the logits.
    assert losses.dlr(5 * z + 7, y).item() == pytest.approx(-0.5)


# ---- APGD ----------------------------------------------------------------------------------
def test_checkpoints_follow_the_paper():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 -> w_j = ceil(p_j * 100)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(0) == []


@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("label", [0, 1])
def test_apgd_reaches_closed_form_optimum(loss, label):
    model, w = binary_linear()
    with torch.no_grad():  # a margin no eps-step can flip: APGD returns its best-loss point
        model[1].bias[label] = 8.0
    x = 0.3 + 0.4 * torch.rand(6, 12)
    y = torch.full((6,), label)
    expected = x + 0.1 * (-w.sign() if label == 1 else w.sign())
    assert bool((model(expected).argmax(1) == y).all())
    # From any start the first step of size 2*eps lands on the optimal vertex.
    got = apgd(model, x, y, eps=0.1, steps=5, loss=loss)
    assert_close(got, expected)  # momentum steps at the vertex may move it by an ulp


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("loss,targeted", [("ce", False), ("dlr", False), ("dlr", True),
                                           ("ce", True)])
def test_apgd_invariants_and_restarts(trained, norm, eps, loss, targeted):
    model, x, y = trained
    x, y = x[:32], y[:32]
    if targeted:
        y = (y + 1) % 4
    x_adv = apgd(model, x, y, eps=eps, norm=norm, steps=6, loss=loss, targeted=targeted,
                 restarts=2)
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert bool((size <= eps * (1 + 1e-5) + 1e-6).all())
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    with torch.no_grad():
        obj = losses.attack_loss(loss, targeted, model(x_adv), y, model(x).argmax(1))
        clean = losses.attack_loss(loss, targeted, model(x), y, model(x).argmax(1))
    # APGD returns its best-loss (or a fooling) iterate: on average far above the clean loss.
    assert float(obj.mean()) > float(clean.mean())


@pytest.mark.parametrize("eps", [0.1, 0.2])
def test_apgd_ce_at_least_as_strong_as_pgd_at_equal_budget(trained, eps):
    # A small budget (5 steps) is where a fixed step (eps/4, the usual choice) hurts most;
    # APGD's 2*eps start and halving schedule need no tuning.
    model, x, y = trained
    assert acc(model, x, y) > 0.95
    torch.manual_seed(1)
    pgd_acc = acc(model, pgd(model, x, y, eps=eps, alpha=eps / 4, steps=5), y)
    apgd_acc = acc(model, apgd(model, x, y, eps=eps, steps=5, loss="ce"), y)
    assert 0.05 < pgd_acc < 0.9  # neither trivial nor hopeless
    assert apgd_acc <= pgd_acc
    torch.manual_seed(2)
    a = apgd(model, x[:16], y[:16], eps=eps, steps=3)
    torch.manual_seed(2)
    assert torch.equal(APGD(model, eps=eps, steps=3)(x[:16], y[:16]), a)


@pytest.mark.parametrize("rho", [0.75, 1.0])
def test_apgd_more_steps_never_weaker_on_fixed_seed(rho):
    """Same seed = same start and trajectory prefix; the best loss only grows, and on a
    binary model a fooling iterate (CE > log 2) beats any non-fooling one."""
    model, _ = binary_linear()
    x, y = 0.3 + 0.4 * torch.rand(8, 12), torch.randint(0, 2, (8,))
    prev = None
    for steps in (1, 5, 20):
        torch.manual_seed(3)
        out = apgd(model, x, y, eps=0.05, steps=steps, rho=rho)
        cur = F.cross_entropy(model(out), y, reduction="none")
        if prev is not None:
            assert bool((cur >= prev - 1e-6).all())
        prev = cur


# ---- evaluate --------------------------------------------------------------------------------
def test_evaluate_worst_case_is_per_sample_and(trained):
    model, x, y = trained
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    eps = 0.1
    atks = {"fgsm": FGSM(model, eps=eps),
            "pgd": PGD(model, eps=eps, alpha=eps / 4, steps=5, random_start=False),
            "pgd-cw": PGD(model, eps=eps, alpha=eps / 4, steps=5, random_start=False,
                          loss="cw")}
    model.train()
    res = evaluate(model, loader, attacks=atks, eps=eps, max_batches=3)
    assert model.training  # restored
    xs, ys = x[:96], y[:96]
    with torch.no_grad():
        clean = model(xs).argmax(1) == ys
        ok = {k: clean & (model(a(xs, ys)).argmax(1) == ys) for k, a in atks.items()}
    assert res["n"] == 96
    assert res["clean"] == pytest.approx(clean.float().mean().item())
    for k in atks:
        assert res["robust"][k] == pytest.approx(ok[k].float().mean().item())
        assert res["worst_case"] <= res["robust"][k]
    both = ok["fgsm"] & ok["pgd"] & ok["pgd-cw"]
    assert res["worst_case"] == pytest.approx(both.float().mean().item())
    # The AND is strictly below the best single attack here (attacks disagree).
    assert res["worst_case"] < max(res["robust"].values())


def test_evaluate_named_suites(trained):
    model, x, y = trained
    res = evaluate(model, [(x[:12], y[:12])], attacks=("pgd10", "pgd3x2", "fgsm", "apgd"),
                   eps=0.1)
    assert set(res["robust"]) == {"pgd10", "pgd3x2", "fgsm", "apgd-ce", "apgd-dlr"}
    assert res["n"] == 12
    assert res["worst_case"] <= min(res["robust"].values()) <= res["clean"]
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate(model, [(x, y)], attacks=("deepfool",))
    with pytest.raises(ValueError, match="no batches"):
        evaluate(model, [], attacks=("fgsm",))


# ---- APGD-T ----------------------------------------------------------------------------------
def test_apgd_t_targets_are_the_top_non_true_classes(monkeypatch):
    import importlib

    apgd_mod = importlib.import_module("sparse_adv_fast.attacks.apgd")  # the module

    z = torch.tensor([[1.0, 5.0, 3.0, 2.0, 0.0, 4.0]])
    assert apgd_mod.top_targets(z, torch.tensor([1]), 9).tolist() == [[5, 2, 3, 0, 4]]
    assert apgd_mod.top_targets(z, torch.tensor([2]), 2).tolist() == [[1, 5]]
    # On a 10-class model every correctly classified sample is attacked towards its 9
    # non-true classes, best-scoring first, the true label kept for the DLR numerator.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    x = torch.rand(6, 12)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    seen = []
    real = apgd_mod._run

    def spy(model, b, **kw):
        seen.append((b.y.clone(), b.y_true.clone(), b.restarts, kw["success"]))
        return real(model, b, **kw)

    monkeypatch.setattr(apgd_mod, "_run", spy)
    apgd_mod.apgd_t(model, x, y, eps=1e-4, steps=2, targets_at_once=9)
    (targets, y_true, reps, success), = seen
    expected = logits.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)[:, :9]
    assert reps == 9 and success == "untargeted"
    assert torch.equal(targets.reshape(9, 6).t(), expected)  # restart-major rows
    assert torch.equal(y_true, y.repeat(9))


def test_apgd_t_agrees_with_torchattacks_apgdt():
    import torchattacks  # the peer oracle (dev extra)

    from sparse_adv_fast.attacks import APGDT, apgd_t
    from tests.test_autoattack import at_blobs

    model, x, y = at_blobs()
    x, y = x[:100], y[:100]
    eps = 0.1
    torch.manual_seed(0)
    ours = apgd_t(model, x, y, eps=eps)
    theirs = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1,
                                n_classes=10, seed=0)(x, y)
    with torch.no_grad():
        a_ours = (model(ours).argmax(1) == y).float().mean().item()
        a_theirs = (model(theirs).argmax(1) == y).float().mean().item()
    assert float((ours - x).abs().max()) <= eps + 1e-6
    assert 0.2 < a_theirs < 0.8
    # Same algorithm, different random starts: 2 of 100 borderline samples may differ.
    assert abs(a_ours - a_theirs) <= 2 / 100 + 1e-9
    torch.manual_seed(3)
    a = apgd_t(model, x[:8], y[:8], eps=eps, steps=5)
    torch.manual_seed(3)
    assert torch.equal(APGDT(model, eps=eps, steps=5)(x[:8], y[:8]), a)


def test_apgd_eot_averages_several_passes():
    model, _ = binary_linear()
    calls = {"n": 0}
    model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    x, y = 0.3 + 0.4 * torch.rand(4, 12), torch.randint(0, 2, (4,))
    apgd(model, x, y, eps=1e-4, steps=3, eot_iter=5)
    assert calls["n"] == 1 + 5 * (3 + 1)  # label check + 5 passes per iterate
    with pytest.raises(ValueError, match="eot_iter"):
        apgd(model, x, y, eps=0.1, eot_iter=0)
