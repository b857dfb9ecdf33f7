"""Model zoo: shapes, Normalize first, exact width scaling, plain layers, build()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import sparse_adv_fast as saf
from sparse_adv_fast import data, models

# (builder, kwargs at a small width, input shape)
CASES = {
    "small_cnn": (models.small_cnn, dict(in_channels=1, image_size=8), (2, 1, 8, 8)),
    "mlp": (models.mlp, dict(in_channels=1, image_size=8), (2, 1, 8, 8)),
    "vgg16": (models.vgg16, dict(in_channels=3, image_size=32), (2, 3, 32, 32)),
    "resnet18": (models.resnet18, dict(in_channels=3, image_size=32), (2, 3, 32, 32)),
}


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _first_leaf(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if not list(m.children()))


@pytest.mark.parametrize("name", list(CASES))
def test_forward_shape_and_normalize_first(name):
    fn, kw, shape = CASES[name]
    model = fn(num_classes=7, width=0.125, **kw).eval()
    x = torch.rand(shape)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    first = _first_leaf(model)
    assert isinstance(first, saf.nn.Normalize)
    # without statistics Normalize is the identity; the model output must not change if
    # we apply it ourselves and then bypass it
    assert torch.equal(first(x), x)


@pytest.mark.parametrize("name", list(CASES))
def test_width_scales_channels_exactly(name):
    fn, kw, shape = CASES[name]
    a = _layers(fn(num_classes=10, width=0.125, **kw))
    b = _layers(fn(num_classes=10, width=0.375, **kw))
    assert len(a) == len(b)
    for la, lb in zip(a[:-1], b[:-1], strict=True):
        out_a = la.out_channels if isinstance(la, nn.Conv2d) else la.out_features
        out_b = lb.out_channels if isinstance(lb, nn.Conv2d) else lb.out_features
        assert out_b == 3 * out_a
    assert a[-1].out_features == b[-1].out_features == 10


def test_width_one_base_channels():
    convs = [m.out_channels for m in models.vgg16(width=0.125).modules()
             if isinstance(m, nn.Conv2d)]
    base = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert convs == [c // 8 for c in base]
    r = models.resnet18(width=0.25)
    assert r.stem[0].out_channels == 16 and r.fc.in_features == 128
    c = models.small_cnn(width=2)
    assert [m.out_channels for m in c if isinstance(m, nn.Conv2d)] == [32, 64]


def test_architecture_details():
    vgg = models.vgg16(width=0.125)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.modules()) == 13
    res = models.resnet18(width=0.125)
    stem = res.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in res.modules())
    assert sum(isinstance(m, models.BasicBlock) for m in res.modules()) == 8
    # only plain torch layers, so saf.sparsify swaps every one
    for model in (vgg, res, models.small_cnn(), models.mlp()):
        assert all(type(m) in (nn.Conv2d, nn.Linear) for m in _layers(model))
        n = len(_layers(model))
        saf.sparsify(model)
        assert len(saf.nn.masked_layers(model)) == n


def test_small_inputs_for_deep_models():
    # digits-sized inputs still work: pooling stops at 1x1
    out = models.vgg16(width=0.125, in_channels=1, image_size=8)(torch.rand(2, 1, 8, 8))
    assert out.shape == (2, 10)


def test_build_uses_dataset_info():
    m = models.build("small_cnn", "digits")
    norm = _first_leaf(m)
    d = data.info("digits")
    assert torch.allclose(norm.mean.flatten(), torch.tensor(d["mean"]))
    assert torch.allclose(norm.std.flatten(), torch.tensor(d["std"]))
    x = torch.rand(3, 1, 8, 8)
    assert m(x).shape == (3, 10)
    r = models.build("resnet18", "cifar10", width=0.125)
    assert r.stem[0].in_channels == 3 and r.fc.out_features == 10
    assert _first_leaf(r).mean.numel() == 3
    m1 = models.build("mlp", "mnist")
    assert _layers(m1)[0].in_features == 28 * 28


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        models.build("alexnet", "digits")
    with pytest.raises(ValueError, match="unknown dataset"):
        models.build("small_cnn", "svhn")
    with pytest.raises(ValueError, match="non-integer"):
        models.small_cnn(width=0.3)
    with pytest.raises(ValueError, match="width"):
        models.resnet18(width=0)
    with pytest.raises(ValueError, match="in_channels"):
        models.small_cnn(in_channels=0)


@pytest.mark.parametrize("w", [1, 0.5, 0.125, 16, 2.0, np.float64(4)])
def test_check_width_accepts_sane_numbers(w):
    assert models.check_width(w) is w


@pytest.mark.parametrize("w", [0, -1, 16.5, 1e9, math.inf, -math.inf, math.nan, True, False,
                               "2", None, [1], torch.tensor(1.0)])
def test_check_width_refuses_with_one_line(w):
    with pytest.raises(ValueError, match=r"^width must be a number in \(0, 16\], got ") as e:
        models.check_width(w)
    assert "\n" not in str(e.value)


def test_build_checks_every_argument_before_allocating():
    with pytest.raises(ValueError, match=r"width must be a number in \(0, 16\], got 1000000000"):
        models.build("vgg16", "cifar10", width=1e9)
    with pytest.raises(ValueError, match="unknown model"):
        models.build(["small_cnn"], "digits")  # unhashable: ValueError, not TypeError
    with pytest.raises(ValueError, match="unknown dataset"):
        models.build("small_cnn", {"digits": 1})
    with pytest.raises(ValueError, match="width must be a number"):
        models.small_cnn(width=17)
    assert models.check_name("mlp") == "mlp"
