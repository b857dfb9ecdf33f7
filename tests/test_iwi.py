"""Inverse Weights Inheritance: ticket and widen modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparse_adv_fast as saf

pytestmark = pytest.mark.usefixtures("torch_backend")


def _cnn(w: int, pool: bool = False) -> nn.Module:
    head = (
        [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 3)] if pool
        else [nn.Flatten(), nn.Linear(2 * w * 4 * 4, 3)]
    )
    return nn.Sequential(
        nn.Conv2d(2, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.BatchNorm2d(2 * w), nn.ReLU(), *head,
    )


def _trained_like(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def test_ticket_copies_surviving_weights_and_leaves_target_dense():
    source = saf.prune.magnitude(_trained_like(_cnn(4)), 0.7)
    x = torch.rand(3, 2, 8, 8)
    for target in (saf.sparsify(_cnn(4)), _cnn(4)):
        out = saf.iwi.inherit(source, target.eval(), mode="ticket")
        assert out is target
        for name, layer in saf.nn.masked_layers(source).items():
            t = target.get_submodule(name)
            assert torch.equal(t.weight, layer.weight * layer.weight_mask)
            assert torch.equal(t.bias, layer.bias)
            if isinstance(t, saf.nn.MaskedConv2d | saf.nn.MaskedLinear):
                assert bool(t.weight_mask.all())
        assert torch.equal(target[1].running_var, source[1].running_var)
        assert int(target[4].num_batches_tracked) == 7
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    # dense: the pruned positions train
    target = saf.iwi.inherit(source, saf.sparsify(_cnn(4)), mode="ticket")
    opt = torch.optim.SGD(target.parameters(), lr=0.1)
    target.train()(x).sum().backward()
    opt.step()
    assert bool((target[0].weight[~source[0].weight_mask] != 0).any())


def test_ticket_noise_only_at_pruned_positions():
    source = saf.prune.magnitude(_cnn(4), 0.6)
    target = saf.iwi.inherit(source, _cnn(4), init="noise", noise_scale=0.1,
                             generator=torch.Generator().manual_seed(0))
    keep = source[3].weight_mask
    assert torch.equal(target[3].weight[keep], source[3].weight[keep])
    pruned = target[3].weight[~keep]
    assert bool((pruned != 0).all())
    expected = 0.1 * float(source[3].weight.detach().std())
    assert float(pruned.detach().std()) == pytest.approx(expected, rel=0.2)


@pytest.mark.parametrize("pool", [False, True])
def test_widen_zero_init_computes_the_source_function(pool):
    source = saf.prune.magnitude(_trained_like(_cnn(3, pool)), 0.5)
    target = saf.sparsify(_cnn(6, pool)).eval()
    saf.iwi.inherit(source, target, mode="widen")
    x = torch.rand(4, 2, 8, 8)
    torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-6)
    assert all(bool(m.all()) for m in saf.masks(target).values())
    w = target[3].weight
    assert torch.equal(w[:6, :3], source[3].weight)
    assert bool((w[6:] == 0).all()) and bool((w[:, 3:] == 0).all())
    assert torch.equal(target[1].running_var[3:], torch.ones(3))
    assert torch.equal(target[1].running_mean[3:], torch.zeros(3))
    assert torch.equal(target[1].weight[3:], torch.ones(3))
    assert torch.equal(target[1].bias[3:], torch.zeros(3))
    # batch statistics too: new channels are all-zero, so they normalise to zero
    torch.testing.assert_close(target.train()(x), source.train()(x), rtol=1e-5, atol=1e-6)


def _grads(model, x):
    model.zero_grad()
    model.train()(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_widen_preserve_keeps_the_function_and_new_units_train_unlike_zero():
    source = _trained_like(_cnn(3))
    x = torch.rand(4, 2, 8, 8)
    zero = saf.iwi.inherit(source, _cnn(6), mode="widen", init="zero")
    kept = saf.iwi.inherit(source, _cnn(6).eval(), mode="widen", init="preserve",
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(kept(x), source(x), rtol=1e-5, atol=1e-6)
    w = kept[3].weight
    assert bool((w[6:, :3] != 0).all())  # into new units: noise
    assert bool((w[:, 3:] == 0).all())  # reading new units: zero
    assert torch.equal(w[:6, :3], source[3].weight)
    assert bool((kept[7].weight[:, 96:] == 0).all())
    gz, gk = _grads(zero, x), _grads(kept, x)
    # the all-zero new units are a saddle: no gradient reaches them at all
    assert bool((gz["3.weight"][:, 3:] == 0).all()) and bool((gz["3.weight"][6:] == 0).all())
    assert bool((gz["7.weight"][:, 96:] == 0).all())
    assert bool((gk["3.weight"][:, 3:] != 0).any()) and bool((gk["7.weight"][:, 96:] != 0).any())


def test_widen_noise_init_fills_parameters_not_buffers():
    source = _trained_like(_cnn(3))
    target = saf.iwi.inherit(source, _cnn(6), mode="widen", init="noise", noise_scale=0.05,
                             generator=torch.Generator().manual_seed(0))
    w = target[0].weight
    assert torch.equal(w[:3], source[0].weight)
    assert bool((w[3:] != 0).all())
    expected = 0.05 * float(source[0].weight.detach().std())
    assert float(w[3:].detach().std()) == pytest.approx(expected, rel=0.3)
    assert torch.equal(target[1].running_mean[3:], torch.zeros(3))
    assert torch.equal(target[1].running_var[3:], torch.ones(3))
    assert bool((target[1].weight[3:] != 1).all())  # gamma 1 + noise


def test_widen_rejects_a_smaller_target_and_other_architectures():
    target = _cnn(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"'0.weight'.*>= the source"):
        saf.iwi.inherit(_cnn(3), target, mode="widen")
    with pytest.raises(ValueError, match="differ"):
        saf.iwi.inherit(_cnn(3), nn.Sequential(nn.Linear(2, 2)), mode="widen")
    with pytest.raises(ValueError, match=r"'0.weight'.*one architecture"):
        saf.iwi.inherit(_cnn(3), target, mode="ticket")
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"mode": "grow"}, ValueError, "mode"),
        ({"init": "ones"}, ValueError, "init"),
        ({"noise_scale": -1.0}, ValueError, "noise_scale"),
        ({"generator": 0}, TypeError, "generator"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        saf.iwi.inherit(_cnn(2), _cnn(2), **kwargs)


def _head(classes: int, w: int = 2) -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, w, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(w * 8 * 8, classes))


@pytest.mark.parametrize("name, target_dataset", [
    ("small_cnn", "cifar10"),  # 3 input channels: the per-tensor shape rule alone lets it by
    ("small_cnn", "mnist"),    # same channels, other statistics and image size
    ("mlp", "mnist"),
])
def test_widen_into_a_model_for_another_dataset_is_refused(name, target_dataset):
    from sparse_adv_fast import models

    source = models.build(name, "digits", width=1)
    target = models.build(name, target_dataset, width=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"^inherit\(widen\): the target is for other data: "
                                         r"input normalisation 0\.mean") as e:
        saf.iwi.inherit(source, target, mode="widen")
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    # the same family for the source's own dataset is accepted
    saf.iwi.inherit(source, models.build(name, "digits", width=2), mode="widen")


def test_inherit_refuses_other_input_statistics_even_with_equal_shapes():
    from sparse_adv_fast import models

    source = models.small_cnn(mean=0.5, std=0.25)
    target = models.small_cnn(mean=0.1, std=0.25)
    for mode in ("ticket", "widen"):
        with pytest.raises(ValueError, match=r"0\.mean is \[0\.5\] in the source and \[0\.1\]"):
            saf.iwi.inherit(source, target, mode=mode)


def test_widen_refuses_another_number_of_classes_or_input_size():
    with pytest.raises(ValueError, match=r"number of classes 3 in the source \('3'\) and 5"):
        saf.iwi.inherit(_head(3), _head(5, w=4), mode="widen")
    wide_in = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 8 * 8, 3))
    with pytest.raises(ValueError, match=r"input size 2 in the source \('0'\) and 4"):
        saf.iwi.inherit(_head(3), wide_in, mode="widen")
    saf.iwi.inherit(_head(3), _head(3, w=4), mode="widen")  # hidden units only: fine
