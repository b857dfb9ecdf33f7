"""HYDRA score-based pruning: exact counts, the zero-epoch rule, scores that learn."""

from __future__ import annotations

import copy
import math

import pytest
import torch
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


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_training_reaches_sparsity_exactly_and_freezes_everything_else(scope):
    model = _net()
    before = {k: v.clone() for k, v in saf.sparsify(model).state_dict().items()}
    model.eval()
    out = saf.prune.hydra(model, 0.55, _loader(), epochs=2, lr=0.5, attack=natural, scope=scope)
    assert out is model and not model.training
    masks = saf.masks(model)
    if scope == "global":
        n = sum(m.numel() for m in masks.values())
        assert sum(int((~m).sum()) for m in masks.values()) == round(0.55 * n)
    else:
        for m in masks.values():
            assert int((~m).sum()) == round(0.55 * m.numel())
    for n in _LAYERS:
        layer = model.get_submodule(n)
        assert torch.equal(layer.weight, before[f"{n}.weight"] * masks[n])
        assert torch.equal(layer.bias, before[f"{n}.bias"])
    assert torch.equal(model[1].weight, before["1.weight"])
    assert all(p.requires_grad for p in model.parameters())


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
    ],
)
def test_bad_arguments(kwargs, exc, match):
    model = _net()
    args = {"sparsity": 0.5, **kwargs}
    with pytest.raises(exc, match=match):
        saf.prune.hydra(model, args.pop("sparsity"), _loader(), **args)
    assert not saf.nn.masked_layers(model)
