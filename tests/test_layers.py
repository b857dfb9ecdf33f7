"""Drop-in masked layers: torch-equivalence, conversions, sparsify and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from tolerances import assert_close
from torch import nn

import sparse_adv_fast as saf
from sparse_adv_fast.nn import MaskedConv2d, MaskedLinear


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d(6)),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 10),
    )


def _random_masks(model: nn.Module, density: float = 0.5) -> dict[str, torch.Tensor]:
    return {n: torch.rand(m.weight.shape) < density for n, m in saf.nn.masked_layers(model).items()}


def test_subclass_and_names():
    lin, conv = MaskedLinear(3, 4), MaskedConv2d(2, 3, 3)
    assert isinstance(lin, nn.Linear) and isinstance(conv, nn.Conv2d)
    assert {n for n, _ in lin.named_parameters()} == {"weight", "bias"}
    assert lin.weight_mask.dtype is torch.bool and lin.weight_mask.shape == lin.weight.shape
    assert conv.weight_mask.shape == conv.weight.shape and bool(conv.weight_mask.all())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_masked_layer_matches_torch_with_masked_weight(kind):
    if kind == "linear":
        dense, x = nn.Linear(7, 5), torch.randn(3, 7)
    else:
        dense = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1)
        x = torch.randn(2, 3, 9, 9)
    masked = type(saf.sparsify(nn.Sequential(dense))[0]).from_dense(dense)
    mask = torch.rand(masked.weight.shape) < 0.6
    oracle_w = dense.weight.detach().clone() * mask
    masked.set_mask(mask)
    ref = (nn.functional.linear(x, oracle_w, dense.bias) if kind == "linear"
           else nn.functional.conv2d(x, oracle_w, dense.bias, 2, 1))
    assert_close(masked(x), ref)


@pytest.mark.parametrize("padding,mode", [("same", "zeros"), (1, "reflect"), (2, "circular")])
def test_conv_padding_modes_match_torch(padding, mode):
    dense = nn.Conv2d(2, 3, 3, padding=padding, padding_mode=mode)
    x = torch.randn(1, 2, 6, 7)
    ref = dense(x)
    masked = MaskedConv2d.from_dense(dense)
    assert_close(masked(x), ref)


def test_from_dense_shares_parameters_and_to_dense_round_trips():
    dense = nn.Linear(4, 3)
    masked = MaskedLinear.from_dense(dense)
    assert masked.weight is dense.weight and masked.bias is dense.bias
    mask = torch.tensor([[1, 0, 1, 0]] * 3, dtype=torch.bool)
    masked.set_mask(mask)
    back = masked.to_dense()
    assert type(back) is nn.Linear
    assert torch.equal(back.weight, dense.weight)
    assert torch.equal(back.weight[:, 1], torch.zeros(3))


def test_sparsify_nested_and_exclude_then_densify():
    model = _net()
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    ref = model(x)
    saf.sparsify(model, exclude=["4"])
    assert isinstance(model[0], MaskedConv2d) and isinstance(model[2][0], MaskedConv2d)
    assert type(model[4]) is nn.Linear
    assert_close(model(x), ref)
    assert saf.sparsity(model) == 0.0
    saf.densify(model)
    assert type(model[0]) is nn.Conv2d and type(model[2][0]) is nn.Conv2d
    assert_close(model(x), ref)


def test_sparsify_exclude_by_type_and_glob():
    model = _net()
    saf.sparsify(model, exclude=[nn.Linear, "2.*"])
    assert type(model[4]) is nn.Linear and type(model[2][0]) is nn.Conv2d
    assert isinstance(model[0], MaskedConv2d)


def test_masks_apply_masks_sparsity_and_layer_sparsity():
    model = saf.sparsify(_net())
    ms = _random_masks(model, 0.3)
    saf.apply_masks(model, ms)
    got = saf.masks(model)
    assert set(got) == {"0", "2.0", "4"}
    for n in ms:
        assert torch.equal(got[n], ms[n])
    total = sum(m.numel() for m in ms.values())
    pruned = sum(int((~m).sum()) for m in ms.values())
    assert saf.sparsity(model) == pytest.approx(pruned / total)
    ls = saf.layer_sparsity(model)
    for n, m in ms.items():
        assert ls[n] == pytest.approx(float((~m).float().mean()))
    for n, layer in saf.nn.masked_layers(model).items():
        assert torch.all(layer.weight[~ms[n]] == 0)


def test_no_grad_autocast_channels_last():
    model = saf.sparsify(_net()).eval()
    saf.apply_masks(model, _random_masks(model))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
        out_cl = model.to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last))
    assert_close(out_cl, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf = model(x)
    assert out_bf.dtype == torch.bfloat16
    assert_close(out_bf.float(), ref, dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_torch_compile_has_no_graph_break_inside_layers(kind):
    if kind == "mlp":
        model = saf.sparsify(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))
        x = torch.randn(4, 6)
    else:
        model = saf.sparsify(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                                           nn.Flatten(), nn.Linear(3 * 5 * 5, 4)))
        x = torch.randn(2, 2, 5, 5)
    saf.apply_masks(model, _random_masks(model))
    ref = model(x)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_close(compiled(x), ref)


# ---- bad input --------------------------------------------------------------------------
def test_wrong_mask_shape_and_dtype_leave_model_unchanged():
    model = saf.sparsify(_net())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = _random_masks(model)
    bad_shape = dict(good, **{"4": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask shape \(3, 3\) does not match weight shape"):
        saf.apply_masks(model, bad_shape)
    bad_dtype = dict(good, **{"4": torch.ones(10, 54)})
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        saf.apply_masks(model, bad_dtype)
    with pytest.raises(ValueError, match="no masked layer named"):
        saf.apply_masks(model, {"nope": good["4"]})
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_model_without_linear_or_conv_is_rejected():
    model = nn.Sequential(nn.ReLU(), nn.Flatten())
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        saf.sparsify(model)
    with pytest.raises(ValueError, match="no masked layer"):
        saf.sparsity(model)


def test_op_input_errors_name_the_problem():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="mask shape"):
        saf.ops.masked_linear(x, w, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        saf.ops.masked_linear(x, w, torch.ones(4, 3))
    with pytest.raises(ValueError, match="weight expects 3"):
        saf.ops.masked_linear(torch.randn(2, 5), w, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype"):
        saf.ops.masked_linear(x.double(), w, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="4-D"):
        saf.ops.masked_conv2d(x, torch.randn(2, 3, 1, 1), torch.ones(2, 3, 1, 1, dtype=torch.bool))


def test_inplace_relu_after_masked_layers_backpropagates():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
    ref_model = copy.deepcopy(model)
    saf.sparsify(model)
    x = torch.randn(2, 1, 6, 6, requires_grad=True)
    out = model(x)
    out.sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    ref_model(xr).sum().backward()
    assert_close(x.grad, xr.grad)
    assert_close(model[3].weight.grad, ref_model[3].weight.grad)
    y3 = saf.ops.masked_linear(torch.randn(2, 3, 4), torch.randn(5, 4),
                               torch.ones(5, 4, dtype=torch.bool))
    assert y3._base is None and y3.shape == (2, 3, 5)
