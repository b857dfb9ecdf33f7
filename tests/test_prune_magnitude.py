"""Magnitude and random pruning against torch.nn.utils.prune (count and tie rule)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

import sparse_adv_fast as saf

pytestmark = pytest.mark.usefixtures("torch_backend")


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 7), nn.ReLU(),
        nn.Linear(7, 3),
    )


_LAYERS = ("0", "3", "5")


def _torch_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight_mask.bool() for n in _LAYERS}


def _torch_global(model: nn.Module, amount) -> None:
    params = [(model.get_submodule(n), "weight") for n in _LAYERS]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=amount)


def _assert_masks_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def _n_weights(model) -> int:
    return sum(model.get_submodule(n).weight.numel() for n in _LAYERS)


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.77, 0.9])
def test_global_matches_torch(s):
    ref = _net()
    ours = saf.prune.magnitude(copy.deepcopy(ref), s)
    _torch_global(ref, s)
    _assert_masks_equal(saf.masks(ours), _torch_masks(ref))
    assert saf.sparsity(ours) == round(s * _n_weights(ref)) / _n_weights(ref)


def test_global_matches_torch_on_already_pruned_model():
    ref = _net()
    ours = saf.prune.magnitude(copy.deepcopy(ref), 0.5)
    _torch_global(ref, 0.5)
    n = _n_weights(ref)
    pruned = round(0.5 * n)
    # torch prunes a fraction of what is left; as an integer amount it is the same target
    ours = saf.prune.magnitude(ours, 0.83)
    _torch_global(ref, round(0.83 * n) - pruned)
    _assert_masks_equal(saf.masks(ours), _torch_masks(ref))
    assert int(sum((~m).sum() for m in saf.masks(ours).values())) == round(0.83 * n)


def test_global_ties_match_torch():
    ref = _net()
    with torch.no_grad():  # a handful of distinct magnitudes: many ties at every cut
        for n in _LAYERS:
            w = ref.get_submodule(n).weight
            w.copy_(torch.randint(-3, 4, w.shape).float())
    ours = saf.prune.magnitude(copy.deepcopy(ref), 0.6)
    _torch_global(ref, 0.6)
    _assert_masks_equal(saf.masks(ours), _torch_masks(ref))


@pytest.mark.parametrize("s", [0.25, 0.5, 0.9])
def test_layer_scope_matches_torch_per_layer(s):
    ref = _net()
    ours = saf.prune.magnitude(copy.deepcopy(ref), 0.2, scope="layer")
    for n in _LAYERS:
        tprune.l1_unstructured(ref.get_submodule(n), "weight", amount=0.2)
    ours = saf.prune.magnitude(ours, s, scope="layer")
    for n in _LAYERS:
        m = ref.get_submodule(n)
        k = round(s * m.weight.numel()) - round(0.2 * m.weight.numel())
        tprune.l1_unstructured(m, "weight", amount=k)
    _assert_masks_equal(saf.masks(ours), _torch_masks(ref))
    for n, v in saf.layer_sparsity(ours).items():
        numel = ours.get_submodule(n).weight.numel()
        assert v == round(s * numel) / numel


def test_pruned_weights_are_zero_biases_untouched_and_model_is_sparsified():
    model = _net()
    biases = [model.get_submodule(n).bias.detach().clone() for n in _LAYERS]
    out = saf.prune.magnitude(model, 0.7)
    assert out is model and isinstance(model[0], saf.nn.MaskedConv2d)
    for n, b in zip(_LAYERS, biases, strict=True):
        m = model.get_submodule(n)
        assert torch.all(m.weight[~m.weight_mask] == 0)
        assert torch.equal(m.bias, b)


def test_bare_layer_is_returned_sparsified():
    out = saf.prune.magnitude(nn.Linear(10, 10), 0.5)
    assert isinstance(out, saf.nn.MaskedLinear) and saf.sparsity(out) == 0.5


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", None, True])
def test_bad_sparsity_raises_and_leaves_model_unchanged(bad):
    model = _net()
    before = copy.deepcopy(model.state_dict())
    for fn in (saf.prune.magnitude, saf.prune.random):
        with pytest.raises(ValueError, match="sparsity"):
            fn(model, bad)
    assert isinstance(model[0], nn.Conv2d) and not isinstance(model[0], saf.nn.MaskedConv2d)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_scope_and_revival_raise_before_any_change():
    model = saf.prune.magnitude(_net(), 0.5)
    masks = saf.masks(model)
    with pytest.raises(ValueError, match="scope"):
        saf.prune.magnitude(model, 0.6, scope="block")
    with pytest.raises(ValueError, match="never revived"):
        saf.prune.magnitude(model, 0.3)
    with pytest.raises(ValueError, match="never revived"):
        saf.prune.random(model, 0.3)
    _assert_masks_equal(saf.masks(model), masks)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_random_counts_nesting_and_generator(scope):
    model = _net()
    n = _n_weights(model)
    saf.prune.random(model, 0.4, scope=scope, generator=torch.Generator().manual_seed(1))
    first = saf.masks(model)
    saf.prune.random(model, 0.75, scope=scope, generator=torch.Generator().manual_seed(2))
    second = saf.masks(model)
    for k in first:
        assert not torch.any(second[k] & ~first[k])  # pruned stay pruned
    if scope == "global":
        assert int(sum((~m).sum() for m in second.values())) == round(0.75 * n)
    else:
        for m in second.values():
            assert int((~m).sum()) == round(0.75 * m.numel())
    again = saf.prune.random(_net(), 0.4, scope=scope, generator=torch.Generator().manual_seed(1))
    _assert_masks_equal(saf.masks(again), first)


def test_random_is_not_magnitude():
    model = _net()
    r = saf.masks(saf.prune.random(copy.deepcopy(model), 0.5))
    m = saf.masks(saf.prune.magnitude(model, 0.5))
    assert any(not torch.equal(r[k], m[k]) for k in r)
