"""The AutoAttack cascade in ``evaluate``: agreement with torchattacks.AutoAttack on a
small adversarially trained model, the report, and the gradient-masking flags."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_adv_fast.attacks import AutoAttack, GradientMaskingWarning, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=1)
def _at_blobs():
    """A 36-64-10 MLP adversarially trained (PGD-3, eps 0.08) on 10 Gaussian blobs
    in [0, 1]^{1x6x6}; well under a second (a plain PGD loop: this is training, not the
    evaluation under test)."""
    g = torch.Generator().manual_seed(0)
    c, d, n = 10, 36, 400
    centers = 0.25 + 0.5 * torch.rand(c, d, generator=g)
    y = torch.arange(n) % c
    x = (centers[y] + 0.12 * torch.randn(n, d, generator=g)).clamp(0, 1).reshape(n, 1, 6, 6)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, c))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    eps = 0.08
    for _ in range(60):
        xa = (x + eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
        for _ in range(3):
            xa.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
            xa = torch.min(torch.max(xa.detach() + eps / 2 * g.sign(), x - eps), x + eps)
            xa = xa.clamp(0, 1)
        opt.zero_grad()
        F.cross_entropy(model(xa), y).backward()
        opt.step()
    return model.eval(), x, y


def at_blobs():
    model, x, y = _at_blobs()
    return model, x.clone(), y.clone()


def test_agrees_with_torchattacks_autoattack():
    import torchattacks  # the peer oracle (dev extra)
    model, x, y = at_blobs()
    x, y = x[:100], y[:100]
    eps = 0.1
    torch.manual_seed(0)
    res = evaluate(model, [(x[:50], y[:50]), (x[50:], y[50:])], attacks=("autoattack",),
                   eps=eps)
    aa = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard",
                                 n_classes=10, seed=0)
    for atk in aa._autoattack.attacks[:3]:  # torchattacks defaults to 10; the paper: 100
        atk.steps = 100
    with torch.no_grad():
        theirs = (model(aa(x, y)).argmax(1) == y).float().mean().item()
    ours = res["robust"]["autoattack"]
    assert 0.2 < theirs < 0.8  # a non-trivial robust model
    # Both are strong ensembles: they can disagree only on borderline points, where the
    # random starts decide. Measured on this model: 0.35 for both over seeds 0-2. Allowed:
    # 2 of the 100 samples (2 points); the issue's +-0.5 points needs >= 600 samples and
    # is measured against the official code in benchmarks/bench_autoattack.py.
    assert abs(ours - theirs) <= 2 / 100 + 1e-9
    rep = res["autoattack"]
    assert list(rep["robust_after"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    after = list(rep["robust_after"].values())
    assert after == sorted(after, reverse=True) and after[-1] == pytest.approx(ours)
    assert sum(rep["broken_by"].values()) == pytest.approx(res["clean"] - ours)
    assert res["worst_case"] == pytest.approx(ours)
    assert not rep["gradient_masking"]["suspected"]


def test_each_stage_runs_only_on_points_still_robust():
    model, x, y = at_blobs()
    x, y = x[:40], y[:40]
    seen = {}
    aa = AutoAttack(model, eps=0.08, steps=5, queries=20)

    def spy(name, fn):
        def run(xx, yy):
            seen[name] = xx.shape[0]
            return fn(xx, yy)
        return run

    aa.stages = {k: spy(k, v) for k, v in aa.stages.items()}
    res = evaluate(model, [(x, y)], attacks={"aa": aa}, eps=0.08)
    counts = [res["clean"] * 40] + [v * 40 for v in res["aa"]["robust_after"].values()]
    for (k, n), before in zip(seen.items(), counts[:-1], strict=True):
        assert n == round(before), k


class _Quantized(nn.Module):
    """Logits of a linear model on 4-level quantised inputs: the input gradient is zero
    everywhere (gradient masking), yet the decision moves with x."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Sequential(nn.Flatten(), nn.Linear(36, 10))

    def forward(self, x):
        return self.lin(torch.floor(x * 4) / 4)


def test_gradient_masking_is_flagged():
    model, x, y = at_blobs()
    q = _Quantized()
    with torch.no_grad():
        q.lin[1].weight.copy_(model[1].weight.new_tensor(torch.randn(10, 36).tolist()))
        y = q(x).argmax(1)
    with pytest.warns(GradientMaskingWarning):
        res = evaluate(q, [(x[:30], y[:30])], attacks=("autoattack",), eps=0.2)
    gm = res["autoattack"]["gradient_masking"]
    assert gm["suspected"] and gm["zero_grad_fraction"] == 1.0
    assert gm["black_box_only_fraction"] > 0  # Square breaks what the gradients cannot
    assert res["autoattack"]["broken_by"]["square"] > 0


class _Noisy(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.02 * torch.randn_like(x))  # noise also in eval mode


def test_randomised_model_flagged_and_rand_version_uses_eot():
    model, x, y = at_blobs()
    noisy = _Noisy(model)
    calls = {"n": 0}
    noisy.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientMaskingWarning)
        res = evaluate(noisy, [(x[:10], y[:10])], attacks={"aa": AutoAttack(
            noisy, eps=0.05, steps=2, queries=5)}, eps=0.05)
    assert res["aa"]["gradient_masking"]["randomized"]
    assert any("autoattack-rand" in r for r in res["aa"]["gradient_masking"]["reasons"])
    aa = AutoAttack(noisy, eps=0.05, version="rand", steps=3)
    assert list(aa.stages) == ["apgd-ce", "apgd-dlr"]
    calls["n"] = 0
    aa.stages["apgd-ce"](x[:4], y[:4])
    assert calls["n"] >= 20 * (3 + 1)  # 20 EOT passes per gradient, as the reference
    r = evaluate(noisy, [(x[:6], y[:6])], attacks=("autoattack-rand",), eps=0.01)
    assert set(r["robust"]) == {"autoattack-rand"}
    gm = r["autoattack-rand"]["gradient_masking"]
    assert gm["randomized"] and not any("autoattack-rand" in t for t in gm["reasons"])


def test_bad_arguments():
    model, x, y = at_blobs()
    with pytest.raises(ValueError, match="version"):
        AutoAttack(model, eps=0.1, version="plus")
    with pytest.raises(ValueError, match="linf"):
        evaluate(model, [(x, y)], attacks=("autoattack",), eps=0.5, norm="l2")
