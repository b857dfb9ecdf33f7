"""Masks are state: checkpoints, copies, dtype moves, optimizers and the weight cache."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import sparse_adv_fast as saf
from sparse_adv_fast.ops import _cache


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


def _pruned(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = saf.sparsify(_net())
    g = torch.Generator().manual_seed(seed + 1)
    saf.apply_masks(model, {
        n: torch.rand(m.weight.shape, generator=g) < 0.4
        for n, m in saf.nn.masked_layers(model).items()
    })
    return model


def _pruned_positions_are_zero(model: nn.Module) -> bool:
    return all(
        bool(torch.all(m.weight[~m.weight_mask] == 0))
        for m in saf.nn.masked_layers(model).values()
    )


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_state_dict_strict_round_trip_into_fresh_sparsified_model():
    src = _pruned(0)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = saf.sparsify(_net())
    dst.load_state_dict(torch.load(buf), strict=True)
    _same_state(src, dst)
    x = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(dst(x), src(x))


def test_deepcopy_pickle_and_to_keep_masks():
    src = _pruned(1)
    for clone in (copy.deepcopy(src), pickle.loads(pickle.dumps(src))):
        _same_state(src, clone)
        assert clone[0].weight is not src[0].weight
        # the copy's invariant is its own: training it does not touch the source
        opt = torch.optim.SGD(clone.parameters(), lr=0.5, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            clone(torch.randn(4, 1, 6, 6)).sum().backward()
            opt.step()
        assert _pruned_positions_are_zero(clone)
    dbl = copy.deepcopy(src).to(torch.float64)
    assert dbl[0].weight.dtype == torch.float64 and dbl[0].weight_mask.dtype == torch.bool
    assert torch.equal(dbl[0].weight_mask, src[0].weight_mask)
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(dbl(x).float(), src(x.float()), atol=1e-5, rtol=1e-5)


def test_dense_state_dict_loads_strictly_and_keeps_mask():
    dense = _net()
    sparse = _pruned(2)
    mask_before = saf.masks(sparse)
    sparse.load_state_dict(dense.state_dict(), strict=True)
    after = saf.masks(sparse)
    for n in mask_before:
        assert torch.equal(after[n], mask_before[n])
    # weights come from the dense checkpoint, re-masked by the kept mask
    for n, layer in saf.nn.masked_layers(sparse).items():
        expect = dense.get_submodule(n).weight.detach() * mask_before[n]
        assert torch.equal(layer.weight.detach(), expect)


def test_densified_state_dict_loads_strictly_into_original_dense_model():
    sparse = _pruned(3)
    x = torch.randn(2, 1, 6, 6)
    ref = sparse(x)
    dense_sd = saf.densify(copy.deepcopy(sparse)).state_dict()
    plain = _net()
    plain.load_state_dict(dense_sd, strict=True)
    torch.testing.assert_close(plain(x), ref)


OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-2),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True,
                                              weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_weights_stay_zero_under_optimizers_with_prior_state(name):
    torch.manual_seed(0)
    model = saf.sparsify(_net())
    opt = OPTIMIZERS[name](model.parameters())
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 5, (8,))
    for _ in range(3):  # build up momentum / Adam moments on every weight
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    masks = {n: torch.rand(m.weight.shape) < 0.3 for n, m in saf.nn.masked_layers(model).items()}
    saf.apply_masks(model, masks)
    assert _pruned_positions_are_zero(model)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for n, layer in saf.nn.masked_layers(model).items():
            assert torch.all(layer.weight.grad[~masks[n]] == 0), "grad not masked"
        opt.step()
        assert _pruned_positions_are_zero(model)
    # and training did happen on the kept weights
    assert any(bool((layer.weight[masks[n]] != 0).any())
               for n, layer in saf.nn.masked_layers(model).items())


def test_masked_weight_cache_skips_mask_work_until_weight_changes():
    model = _pruned(4)
    x = torch.randn(3, 1, 6, 6)
    layer = model[3]
    with _cache.frozen(model):  # what an attack runs in
        model(x)  # the first use in the scope builds each layer's masked form
        _cache.stats.reset()
        versions = layer.weight._version
        for _ in range(10):  # an attack: many forwards over unchanged weights
            with torch.no_grad():
                model(x)
        assert _cache.stats.builds == 0
        assert _cache.stats.hits >= 10
        assert layer.weight._version == versions, "no mask work: the weight was not rewritten"
        with torch.no_grad():
            layer.weight.add_(1.0)  # an in-place update invalidates, even inside the scope
        out = model(x)
        assert _cache.stats.builds == 1  # that layer's masked form only
    assert torch.all(layer.weight[~layer.weight_mask] == 0)
    ref = nn.functional.linear(
        torch.relu(nn.functional.conv2d(x, model[0].weight * model[0].weight_mask,
                                        model[0].bias)).flatten(1),
        layer.weight * layer.weight_mask, layer.bias)
    torch.testing.assert_close(out, ref)


def test_functional_op_cache_invalidated_by_in_place_update():
    w, mask = torch.randn(4, 3), torch.rand(4, 3) > 0.5
    x = torch.randn(2, 3)
    _cache.stats.reset()
    with saf.backends.using("torch"), _cache.frozen([w]):
        saf.ops.masked_linear(x, w, mask)
        saf.ops.masked_linear(x, w, mask)
        assert _cache.stats.builds == 1 and _cache.stats.hits >= 1
        w.mul_(2.0)
        y = saf.ops.masked_linear(x, w, mask)
    assert _cache.stats.builds == 2
    torch.testing.assert_close(y, x @ (w * mask).t())


def test_reassigned_weight_parameter_is_masked_and_kept_zero():
    model = _pruned(5)
    layer = model[3]
    layer.weight = nn.Parameter(torch.randn_like(layer.weight))  # e.g. a user re-init
    x = torch.randn(4, 1, 6, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
        assert torch.all(layer.weight[~layer.weight_mask] == 0)
