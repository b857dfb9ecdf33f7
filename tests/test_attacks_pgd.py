"""FGSM / PGD against hand-computed cases and a hand-written Madry loop; invariants;
batched restarts vs sequential runs; per-sample early stop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_adv_fast as saf
from sparse_adv_fast.attacks import FGSM, PGD, fgsm, pgd
from tests.tolerances import assert_close


def binary_linear(d: int = 12, seed: int = 1) -> tuple[nn.Module, torch.Tensor]:
    """Two logits with z1 - z0 = w.x: the L∞ loss-maximiser for label 1 is x - eps*sign(w)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    w = torch.where(w.abs() < 0.1, torch.full_like(w, 0.5), w)  # no zero entries
    lin = nn.Linear(d, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[1] = w
        lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin), w


def mlp(d: int = 12, c: int = 5, seed: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, c))


def small_cnn(c: int = 4) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        saf.nn.Normalize([0.5, 0.5], [0.25, 0.25]), nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, c),
    ).eval()


def per_sample_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


# ---- closed form on a linear binary margin ------------------------------------------
@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_fgsm_and_pgd_reach_closed_form_optimum(loss):
    model, w = binary_linear()
    x = 0.3 + 0.4 * torch.rand(6, 12)  # eps-ball stays inside [0, 1]: clipping inactive
    y = torch.tensor([1, 0, 1, 1, 0, 0])
    eps = 0.1
    direction = torch.where(y[:, None] == 1, -w.sign(), w.sign())
    expected = x + eps * direction
    assert torch.equal(fgsm(model, x, y, eps=eps, loss=loss), expected)
    got = pgd(model, x, y, eps=eps, alpha=eps / 4, steps=7, random_start=False, loss=loss)
    assert torch.equal(got, expected)
    # From a random start the iterate still ends at the vertex (alpha*steps >= 2 eps).
    got = pgd(model, x, y, eps=eps, alpha=eps / 4, steps=9, random_start=True, loss=loss)
    assert torch.equal(got, expected)


def test_l2_fgsm_and_pgd_reach_closed_form_optimum():
    # The L2 loss-maximiser of a linear margin is the ball's point along -w (label 1).
    model, w = binary_linear()
    x = 0.3 + 0.4 * torch.rand(5, 12)
    y = torch.tensor([1, 0, 1, 0, 1])
    eps = 0.2  # |delta_i| <= eps < 0.3: clipping inactive
    unit = w / w.norm()
    expected = x + eps * torch.where(y[:, None] == 1, -unit, unit)
    assert_close(fgsm(model, x, y, eps=eps, norm="l2"), expected)
    got = pgd(model, x, y, eps=eps, alpha=eps / 3, steps=5, norm="l2", random_start=False)
    assert_close(got, expected)


def test_pgd_targeted_moves_toward_target_on_linear_model():
    model, w = binary_linear()
    x = 0.3 + 0.4 * torch.rand(4, 12)
    t = torch.tensor([0, 1, 0, 1])
    got = pgd(model, x, t, eps=0.1, alpha=0.05, steps=5, random_start=False, targeted=True)
    expected = x + 0.1 * torch.where(t[:, None] == 1, w.sign(), -w.sign())
    assert torch.equal(got, expected)


def test_fgsm_random_start_is_one_step_from_the_start():
    model = mlp()
    x, y = torch.rand(5, 12), torch.randint(0, 5, (5,))
    eps, alpha = 0.1, 0.125
    torch.manual_seed(7)
    got = fgsm(model, x, y, eps=eps, random_start=True, alpha=alpha)
    torch.manual_seed(7)
    x0 = saf.ops.random_start(x, eps=eps)
    x0.requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(model(x0), y), x0)
    nxt = torch.minimum(torch.maximum(x0.detach() + alpha * g.sign(), x - eps), x + eps)
    assert_close(got, nxt.clamp(0, 1))


# ---- textbook Madry PGD oracle ---------------------------------------------------------
def madry_pgd(model, x, y, eps, alpha, steps, norm):
    """Plain Madry et al. PGD from x (no random start), written independently."""
    xa = x.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        loss = F.cross_entropy(model(xa), y)
        (g,) = torch.autograd.grad(loss, xa)
        with torch.no_grad():
            if norm == "linf":
                xa = xa + alpha * g.sign()
                xa = torch.minimum(torch.maximum(xa, x - eps), x + eps)
            else:
                gn = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                xa = xa + alpha * g / gn
                d = xa - x
                dn = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                xa = x + d * torch.clamp(eps / dn, max=1.0)
            xa = xa.clamp(0.0, 1.0)
    return xa.detach()


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)])
def test_deterministic_pgd_matches_madry_loop(norm, eps, alpha):
    model = small_cnn()
    x, y = torch.rand(6, 2, 5, 5), torch.randint(0, 4, (6,))
    expected = madry_pgd(model, x, y, eps, alpha, 6, norm)
    got = pgd(model, x, y, eps=eps, alpha=alpha, steps=6, norm=norm, random_start=False)
    assert_close(got, expected)
    atk = PGD(model, eps=eps, alpha=alpha, steps=6, norm=norm, random_start=False)
    assert_close(atk(x, y), expected)


# ---- invariants ------------------------------------------------------------------------
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.4)])
@pytest.mark.parametrize("loss", ["ce", "cw", "dlr"])
def test_outputs_in_ball_and_range(norm, eps, loss):
    model = mlp()
    x = torch.rand(7, 12)
    x[0] = 0.0  # corners of the data range: clipping active
    x[1] = 1.0
    y = torch.randint(0, 5, (7,))
    for x_adv in (
        pgd(model, x, y, eps=eps, alpha=eps / 3, steps=5, norm=norm, restarts=3, loss=loss),
        fgsm(model, x, y, eps=eps, norm=norm, loss=loss),
        pgd(model, x, y, eps=eps, alpha=eps / 3, steps=5, norm=norm, early_stop=True,
            loss=loss),
    ):
        assert x_adv.shape == x.shape
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        d = (x_adv - x).flatten(1)
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert bool((size <= eps * (1 + 1e-5) + 1e-6).all())


def test_loss_never_below_clean_without_random_start():
    model, _ = binary_linear()  # CE is convex in x here: PGD never loses ground
    x, y = torch.rand(16, 12), torch.randint(0, 2, (16,))
    clean = per_sample_ce(model, x, y)
    for restarts in (1, 3):
        x_adv = pgd(model, x, y, eps=0.05, alpha=0.02, steps=5, random_start=False,
                    restarts=restarts)
        assert bool((per_sample_ce(model, x_adv, y) >= clean).all())


def test_more_steps_never_weaker_on_linear_model():
    model, _ = binary_linear()
    x, y = torch.rand(16, 12), torch.randint(0, 2, (16,))
    prev = None
    for steps in (0, 1, 2, 4, 8):
        torch.manual_seed(5)  # same random start every time
        x_adv = pgd(model, x, y, eps=0.1, alpha=0.01, steps=steps)
        cur = per_sample_ce(model, x_adv, y)
        if prev is not None:
            assert bool((cur >= prev - 1e-6).all()), steps
        prev = cur


# ---- batched restarts ------------------------------------------------------------------
def test_batched_restarts_equal_best_of_sequential_runs():
    model = mlp()
    b, r, eps = 48, 4, 0.02
    x = torch.rand(b, 12)
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct: being fooled is up to the restarts
    starts = [saf.ops.random_start(x, eps=eps) for _ in range(r)]
    got = pgd(model, x, y, eps=eps, alpha=eps / 4, steps=4, restarts=r,
              x_init=torch.cat(starts))
    runs = [pgd(model, x, y, eps=eps, alpha=eps / 4, steps=4, x_init=s) for s in starts]
    with torch.no_grad():
        losses = torch.stack([per_sample_ce(model, xa, y) for xa in runs])  # [R, B]
        fooled = torch.stack([model(xa).argmax(1) != y for xa in runs])
    expected = torch.empty_like(x)
    for i in range(b):
        pick = int(fooled[:, i].float().argmax()) if fooled[:, i].any() else \
            int(losses[:, i].argmax())
        expected[i] = runs[pick][i]
    # The case mix makes the test meaningful: some samples fooled by a later restart only,
    # some never fooled (best loss decides).
    assert bool(fooled.any(0).any()) and bool((~fooled.any(0)).any())
    assert bool((fooled.any(0) & ~fooled[0]).any())
    assert_close(got, expected)
    # The returned restart is never weaker than any single restart.
    best = per_sample_ce(model, got, y)
    never = ~fooled.any(0)
    assert bool((best[never] >= losses[:, never].amax(0) - 1e-6).all())


def test_restarts_use_global_generator():
    model = mlp()
    x, y = torch.rand(6, 12), torch.randint(0, 5, (6,))
    torch.manual_seed(11)
    a = pgd(model, x, y, eps=0.1, alpha=0.03, steps=3, restarts=3)
    torch.manual_seed(11)
    b = pgd(model, x, y, eps=0.1, alpha=0.03, steps=3, restarts=3)
    assert torch.equal(a, b)


# ---- early stop ------------------------------------------------------------------------
@pytest.mark.parametrize("restarts", [1, 2])
def test_early_stop_leaves_unfooled_samples_unchanged(restarts):
    model = mlp()
    x, y = torch.rand(32, 12), torch.randint(0, 5, (32,))
    kw = dict(eps=0.06, alpha=0.015, steps=10, restarts=restarts)
    torch.manual_seed(4)
    full = pgd(model, x, y, **kw)
    torch.manual_seed(4)
    es = pgd(model, x, y, early_stop=True, **kw)
    with torch.no_grad():
        f_full = model(full).argmax(1) != y
        f_es = model(es).argmax(1) != y
    assert bool((~f_es).any()) and bool(f_es.any())
    assert bool((f_es | ~f_full).all())  # everything fooled without early stop still is
    assert_close(es[~f_es], full[~f_es])
    # Some fooled samples were frozen before the end (early stop did something).
    assert not torch.allclose(es[f_es], full[f_es])


def test_fgsm_callable_and_zero_eps():
    model = mlp()
    x, y = torch.rand(4, 12), torch.randint(0, 5, (4,))
    assert torch.equal(FGSM(model, eps=0.05)(x, y), fgsm(model, x, y, eps=0.05))
    assert torch.equal(fgsm(model, x, y, eps=0.0), x)
    assert torch.equal(pgd(model, x, y, eps=0.0, alpha=0.1, steps=3), x)


# ---- restart chunks and once-per-attack checks -------------------------------------------
def test_chunked_restarts_equal_one_batch_of_all_rows(monkeypatch):
    """On CPU R*B rows run in chunks of B; the result equals running them all at once."""
    import importlib

    from sparse_adv_fast.ops.restart_select import row_chunks

    pgd_mod = importlib.import_module("sparse_adv_fast.attacks.pgd")
    core = importlib.import_module("sparse_adv_fast.attacks._core")

    model = mlp()
    b, r = 20, 3
    x, y = torch.rand(b, 12), torch.randint(0, 5, (b,))
    assert len(row_chunks(r * b, r, x.device)) == r  # the default really chunks here
    torch.manual_seed(5)
    chunked = pgd(model, x, y, eps=0.05, alpha=0.02, steps=4, restarts=r)
    for mod in (pgd_mod, core):
        monkeypatch.setattr(mod, "row_chunks", lambda rows, restarts, dev: [slice(0, rows)])
    torch.manual_seed(5)
    whole = pgd(model, x, y, eps=0.05, alpha=0.02, steps=4, restarts=r)
    assert_close(chunked, whole)


class CountingForwards(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.rows: list[int] = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.net(x)


@pytest.mark.parametrize("early_stop", [False, True])
def test_checks_add_no_forward_to_the_attack(early_stop):
    """Label and gradient checks ride on the first step: PGD-k is k forwards, no more."""
    model = CountingForwards()
    x, y = torch.rand(6, 12), torch.randint(0, 5, (6,))
    pgd(model, x, y, eps=1e-3, alpha=1e-4, steps=3, early_stop=early_stop)
    assert model.rows[0] == 6 and len(model.rows) <= 3, model.rows


def test_label_out_of_range_in_a_later_restart_chunk_is_caught():
    model = CountingForwards()
    b, r = 20, 3
    x, y = torch.rand(b, 12), torch.randint(0, 5, (b,))
    y[-1] = 5  # the model has 5 outputs
    with pytest.raises(ValueError, match="label 5 is out of range for a model with 5 outputs"):
        pgd(model, x, y, eps=0.05, alpha=0.02, steps=2, restarts=r)
    assert len(model.rows) == 1, "the check runs on the first forward, before any step"
