"""Round trips between masked layers and torch.nn.utils.prune's reparametrisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

import sparse_adv_fast as saf

pytestmark = pytest.mark.usefixtures("torch_backend")


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
    ).eval()


def test_to_torch_prune_keeps_function_masks_and_uses_torch_keys():
    model = saf.prune.magnitude(_net(), 0.6)
    x = torch.rand(2, 2, 5, 5)
    y = model(x)
    masks = saf.masks(model)
    tp = saf.prune.to_torch_prune(model)
    for n in ("0", "4"):
        m = tp.get_submodule(n)
        assert type(m) in (nn.Conv2d, nn.Linear)
        assert tprune.is_pruned(m)
        assert torch.equal(m.weight_mask.bool(), masks[n])
    keys = set(tp.state_dict())
    assert {"0.weight_orig", "0.weight_mask", "0.bias", "4.weight_orig", "4.weight_mask"} <= keys
    assert "0.weight" not in keys
    torch.testing.assert_close(tp(x), y, rtol=0, atol=1e-6)


def test_from_torch_prune_round_trip():
    model = saf.prune.magnitude(_net(), 0.5, scope="layer")
    x = torch.rand(3, 2, 5, 5)
    y = model(x)
    masks = saf.masks(model)
    keys = set(model.state_dict())
    back = saf.prune.from_torch_prune(saf.prune.to_torch_prune(model))
    assert isinstance(back[0], saf.nn.MaskedConv2d) and isinstance(back[4], saf.nn.MaskedLinear)
    assert set(back.state_dict()) == keys
    for n, m in saf.masks(back).items():
        assert m.dtype is torch.bool and torch.equal(m, masks[n])
    assert not any(len(back.get_submodule(n)._forward_pre_hooks) for n in ("0", "4"))
    torch.testing.assert_close(back(x), y, rtol=0, atol=1e-6)


def test_from_torch_prune_of_torch_pruned_model():
    ref = _net()
    tprune.l1_unstructured(ref[0], "weight", amount=0.5)
    tprune.random_unstructured(ref[4], "weight", amount=0.3)
    x = torch.rand(2, 2, 5, 5)
    y = ref(x)
    w_orig = ref[4].weight_orig.detach().clone()
    mask = ref[4].weight_mask.bool()
    ours = saf.prune.from_torch_prune(ref)  # (torch's pruned modules cannot be deepcopied)
    assert torch.equal(ours[4].weight_mask, mask)
    assert torch.equal(ours[4].weight, w_orig * mask)
    assert saf.sparsity(ours) == pytest.approx(
        (round(0.5 * 54) + round(0.3 * 300)) / (54 + 300)
    )
    torch.testing.assert_close(ours(x), y, rtol=0, atol=1e-6)
    # training keeps the zeros (a masked layer now, no hook)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        ours.train()(x).sum().backward()
        opt.step()
    assert torch.all(ours[4].weight[~mask] == 0)


def test_from_torch_prune_rejects_pruned_bias_and_unpruned_model():
    ref = _net()
    tprune.l1_unstructured(ref[4], "weight", amount=0.5)
    tprune.l1_unstructured(ref[4], "bias", amount=0.5)
    with pytest.raises(ValueError, match="bias"):
        saf.prune.from_torch_prune(ref)
    assert tprune.is_pruned(ref[4]) and type(ref[4]) is nn.Linear
    with pytest.raises(ValueError, match="no torch-pruned"):
        saf.prune.from_torch_prune(_net())
    with pytest.raises(ValueError, match="no masked layer"):
        saf.prune.to_torch_prune(_net())


def test_bare_layer_round_trip():
    layer = saf.prune.magnitude(nn.Linear(6, 5), 0.4)
    mask = layer.weight_mask.clone()
    tp = saf.prune.to_torch_prune(layer)
    assert type(tp) is nn.Linear and tprune.is_pruned(tp)
    back = saf.prune.from_torch_prune(tp)
    assert isinstance(back, saf.nn.MaskedLinear) and torch.equal(back.weight_mask, mask)
