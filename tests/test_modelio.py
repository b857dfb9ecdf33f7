"""Model checkpoints: arch fields and state_dict shapes are checked before any real build."""

from __future__ import annotations

import math

import pytest
import torch

import sparse_adv_fast as saf
from sparse_adv_fast import checkpoint, models
from sparse_adv_fast.pipeline import modelio

GOOD = {"name": "small_cnn", "dataset": "digits", "width": 0.5, "masked": False}


def _save(tmp_path, arch, state=None, name="m.pt"):
    """A checkpoint file holding ``arch`` and ``state`` (default: a real small_cnn's)."""
    if state is None:
        state = models.build("small_cnn", "digits", width=0.5).state_dict()
    path = tmp_path / name
    checkpoint.save_atomic({"kind": modelio.KIND, "arch": arch, "state_dict": state,
                            "meta": {}}, path)
    return path


def _refused(path, *fragments):
    with pytest.raises(ValueError) as e:
        modelio.load_model(path)
    msg = str(e.value)
    assert "\n" not in msg and f"checkpoint {str(path)!r}" in msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


@pytest.mark.parametrize("masked", [False, True])
def test_round_trip_rebuilds_the_same_model(tmp_path, masked):
    saf.backends.use("torch")  # this is about the file, not kernels: no extension build
    arch = modelio.arch_spec("small_cnn", "digits", 0.5, masked)
    net = modelio.build(arch)
    if masked:
        saf.prune.magnitude(net, 0.5)
    modelio.save_model(net, arch, tmp_path / "m.pt")
    back, blob = modelio.load_model(tmp_path / "m.pt")
    assert blob["arch"] == arch and modelio.is_masked(back) is masked
    assert net.state_dict().keys() == back.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    if masked:
        assert saf.sparsity(back) == saf.sparsity(net) > 0.4
    else:  # (a masked forward pays the ops' one-off start-up; state equality suffices)
        x = torch.rand(3, 1, 8, 8)
        assert torch.equal(net.eval()(x), back.eval()(x))


@pytest.mark.parametrize("field", modelio.ARCH_FIELDS)
def test_missing_field_is_named(tmp_path, field):
    arch = {k: v for k, v in GOOD.items() if k != field}
    _refused(_save(tmp_path, arch), f"arch lacks {field!r}")


def test_unknown_field_and_non_dict_arch(tmp_path):
    _refused(_save(tmp_path, {**GOOD, "depth": 10**9}), "unknown field", "'depth'")
    _refused(_save(tmp_path, ["small_cnn", "digits"]), "arch must be a dict", "list")


@pytest.mark.parametrize("field, value, fragment", [
    ("name", 5, "arch name: unknown model 5"),
    ("name", ["small_cnn"], "arch name: unknown model"),
    ("name", "alexnet", "unknown model 'alexnet'"),
    ("dataset", "svhn", "arch dataset: unknown dataset 'svhn'"),
    ("dataset", {"a": 1}, "arch dataset: unknown dataset"),
    ("width", 1e9, "arch width must be a number in (0, 16], got 1000000000.0"),
    ("width", 0, "arch width must be"),
    ("width", -2, "arch width must be"),
    ("width", math.inf, "arch width must be"),
    ("width", math.nan, "arch width must be"),
    ("width", True, "arch width must be"),
    ("width", "2", "arch width must be"),
    ("width", None, "arch width must be"),
    ("width", 0.3, "non-integer"),
    ("masked", 1, "arch masked: must be true or false"),
    ("masked", "yes", "arch masked: must be true or false"),
])
def test_bad_field_is_named(tmp_path, field, value, fragment):
    _refused(_save(tmp_path, {**GOOD, field: value}), fragment)


def test_shapes_are_checked_on_meta_before_a_real_build(tmp_path, monkeypatch):
    small = models.build("small_cnn", "digits", width=0.5).state_dict()
    built = []
    real_build = models.build

    def spy(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.append({p.device.type for p in model.parameters()})
        return model

    monkeypatch.setattr(models, "build", spy)
    # the largest arch allowed (~3.7e9 parameters) named by a file of a few KB
    huge = {"name": "vgg16", "dataset": "cifar10", "width": 16, "masked": True}
    _refused(_save(tmp_path, huge, small), "state_dict does not match", "missing")
    assert built == [{"meta"}]  # never allocated for real


def test_state_dict_mismatches_are_named(tmp_path):
    state = models.build("small_cnn", "digits", width=0.5).state_dict()
    wrong = {**state, "1.weight": torch.zeros(9, 1, 3, 3)}
    _refused(_save(tmp_path, GOOD, wrong), "1.weight is (9, 1, 3, 3), arch needs (8, 1, 3, 3)")
    _refused(_save(tmp_path, GOOD, {**state, "extra": torch.zeros(1)}), "unexpected extra")
    dense = models.build("small_cnn", "digits", width=0.5).state_dict()
    _refused(_save(tmp_path, {**GOOD, "masked": True}, dense), "missing 1.weight_mask")
    _refused(_save(tmp_path, GOOD, {"1.weight": [1, 2]}), "state_dict must be a dict of tensors")


def test_not_a_model_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    checkpoint.save_atomic({"state_dict": {}}, path)
    _refused(path, "not a sparse-adv-fast model checkpoint")


def test_arch_spec_and_build_check_their_arguments():
    assert modelio.arch_spec("mlp", "mnist", 2.0) == {
        "name": "mlp", "dataset": "mnist", "width": 2, "masked": False}
    with pytest.raises(ValueError, match=r"width must be a number in \(0, 16\], got 100"):
        modelio.arch_spec("mlp", "mnist", 100)
    with pytest.raises(ValueError, match="model: arch lacks 'masked'"):
        modelio.build({"name": "mlp", "dataset": "mnist", "width": 1})
    with pytest.raises(ValueError, match="unknown dataset"):
        modelio.arch_spec("mlp", "svhn")
