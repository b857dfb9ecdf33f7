"""fit: argument checks, History, schedules, rewind point, masks, natural accuracy."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import sparse_adv_fast as saf
from sparse_adv_fast import data, models
from sparse_adv_fast.finite import NonFiniteError
from sparse_adv_fast.train import History, fit


def _tiny(seed: int = 0, n_train: int = 96, n_test: int = 64):
    torch.manual_seed(seed)
    model = models.build("small_cnn", "digits", width=0.5)
    loaders = data.loaders("digits", batch_size=32, train_subset=n_train, test_subset=n_test,
                           seed=seed)
    return model, loaders


class _Untouchable:
    """A loader that fails the test if fit iterates it before rejecting bad arguments."""

    def __iter__(self):
        raise AssertionError("fit did work before validating its arguments")

    def __len__(self):
        raise AssertionError("fit did work before validating its arguments")


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="mart"), "unknown method 'mart'"),
    (dict(optimizer="rmsprop"), "unknown optimizer 'rmsprop'"),
    (dict(schedule="onecycle"), "unknown schedule 'onecycle'"),
    (dict(epochs=-1), "epochs"),
    (dict(epochs=1.5), "epochs"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(lr=-1e-3), "lr"),
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(eps=float("nan")), "eps"),
    (dict(norm="l1"), "unknown norm"),
    (dict(steps=0), "steps"),
    (dict(alpha=0.0), "alpha"),
    (dict(rewind_at=-1), "rewind_at"),
    (dict(max_batches=0), "max_batches"),
    (dict(co_ratio=1.5), "co ratio"),
    (dict(log=3), "log"),
])
def test_bad_input_rejected_before_work(kwargs, match):
    model = models.small_cnn(width=0.5)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        fit(model, (_Untouchable(), _Untouchable()), progress=False, **kwargs)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_loaders():
    model = models.small_cnn(width=0.5)
    with pytest.raises(ValueError, match="loaders"):
        fit(model, [1, 2, 3], progress=False)
    with pytest.raises(ValueError, match="'train'"):
        fit(model, {"val": None}, progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        fit("model", (None, None), progress=False)


def test_history_records_and_json():
    model, (tr, te) = _tiny()
    h = fit(model, {"train": tr, "val": te}, "natural", epochs=2, lr=0.05, progress=False,
            max_batches=2, val_batches=1, val_steps=2)
    assert isinstance(h, History) and len(h) == 2
    assert [e["epoch"] for e in h.epochs] == [1, 2]
    assert h.iterations == 4
    for e in h.epochs:
        assert set(e) == {"epoch", "train_loss", "train_acc", "val_clean_acc", "val_pgd_acc",
                          "lr", "time"}
        assert math.isfinite(e["train_loss"]) and 0 <= e["train_acc"] <= 1
        assert 0 <= e["val_clean_acc"] <= 1 and 0 <= e["val_pgd_acc"] <= 1
    d = json.loads(json.dumps(h.as_dict()))
    assert d["epochs"][1]["lr"] == h.lr[1]
    assert History.from_dict(d).as_dict() == d
    assert h.co_detected_epoch is None and not h.rolled_back


def test_no_val_loader_and_zero_epochs():
    model, (tr, _) = _tiny()
    h = fit(model, (tr, None), "natural", epochs=1, progress=False, max_batches=1)
    assert h.val_clean_acc == [None] and h.val_pgd_acc == [None]
    before = copy.deepcopy(model.state_dict())
    h0 = fit(model, (tr, None), "natural", epochs=0, progress=False)
    assert len(h0) == 0 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("schedule, expected", [
    ("cosine", [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]),
    ("step", [0.1, 0.1, 0.01, 0.001]),
    ("none", [0.1] * 4),
])
def test_schedules(schedule, expected):
    model, (tr, _) = _tiny()
    h = fit(model, (tr, None), "natural", epochs=4, lr=0.1, schedule=schedule,
            progress=False, max_batches=1)
    assert h.lr == pytest.approx(expected)


def test_adam_optimizer_runs():
    model, (tr, te) = _tiny()
    h = fit(model, (tr, te), "natural", epochs=1, lr=1e-3, optimizer="adam", progress=False,
            max_batches=2, val_batches=1, val_steps=1)
    assert math.isfinite(h.train_loss[0])


def test_rewind_state_is_the_state_at_iteration_k():
    model, (tr, _) = _tiny(seed=1)
    init = copy.deepcopy(model)
    h = fit(model, (tr, None), "natural", epochs=2, lr=0.05, schedule="none", progress=False,
            max_batches=3, rewind_at=2)
    # an independent run of exactly 2 iterations from the same start
    _, (tr2, _) = _tiny(seed=1)
    torch.manual_seed(1)
    ref = copy.deepcopy(init)
    fit(ref, (tr2, None), "natural", epochs=1, lr=0.05, schedule="none", progress=False,
        max_batches=2)
    assert h.rewind_at == 2 and h.rewind_state is not None
    for k, v in ref.state_dict().items():
        assert torch.equal(h.rewind_state[k], v), k
    assert not torch.equal(h.rewind_state["1.weight"], model.state_dict()["1.weight"])
    h0 = fit(copy.deepcopy(init), (tr, None), epochs=1, progress=False, max_batches=1,
             rewind_at=0)
    for k, v in init.state_dict().items():
        assert torch.equal(h0.rewind_state[k], v)


def test_pruned_weights_stay_zero_through_pgd_at():
    model, (tr, _) = _tiny()
    saf.sparsify(model)
    layers = saf.nn.masked_layers(model)
    gen = torch.Generator().manual_seed(0)
    for layer in layers.values():
        layer.set_mask(torch.rand(layer.weight.shape, generator=gen) > 0.6)
    masks = {n: m.weight_mask.clone() for n, m in layers.items()}
    h = fit(model, (tr, None), "pgd", epochs=2, lr=0.05, weight_decay=5e-3, steps=1,
            progress=False, max_batches=2)
    assert len(h) == 2
    for n, layer in saf.nn.masked_layers(model).items():
        assert torch.equal(layer.weight_mask, masks[n])
        assert bool((layer.weight[~masks[n]] == 0).all()), n
        assert bool((layer.weight[masks[n]] != 0).any()), n


@pytest.mark.slow
def test_small_cnn_natural_reaches_90_percent_on_digits():
    torch.manual_seed(0)
    model = models.build("small_cnn", "digits")
    tr, te = data.loaders("digits", batch_size=32)
    h = fit(model, (tr, te), "natural", epochs=2, lr=3e-3, optimizer="adam", progress=False,
            val_batches=1, val_steps=1)
    assert h.val_clean_acc[-1] > 0.9


def test_progress_bar_and_explicit_device(capsys):
    model, (tr, _) = _tiny()
    fit(model, (tr, None), "natural", epochs=1, progress=True, max_batches=2, device="cpu")
    assert "natural 1/1" in capsys.readouterr().err
    fit(model, (tr, None), "natural", epochs=1, progress=False, max_batches=2, device="cpu")
    assert "natural 1/1" not in capsys.readouterr().err


def test_non_finite_loss_is_an_error():
    model, (tr, _) = _tiny()
    # Finite weights, but an input that makes the loss NaN: the loss check names the epoch.
    bad = _Spy([(torch.full_like(x, float("nan")), y) for x, y in tr])
    with pytest.raises(NonFiniteError, match=r"loss became non-finite in epoch 1"):
        fit(model, bad, "natural", epochs=1, progress=False, max_batches=2)


class _Spy:
    """A loader that records whether fit iterated it."""

    def __init__(self, loader):
        self.loader, self.used = loader, False

    def __iter__(self):
        self.used = True
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def test_a_dict_with_test_but_no_val_is_refused_unless_asked():
    model = models.small_cnn(width=0.5)
    with pytest.raises(ValueError, match=r"'test' but no 'val'.*val_on_test=True"):
        fit(model, {"train": _Untouchable(), "test": _Untouchable()}, progress=False)
    _, (tr, te) = _tiny()
    kw = dict(epochs=1, progress=False, max_batches=1, val_batches=1, val_steps=1)
    spy = _Spy(te)
    h = fit(model, {"train": tr, "test": spy}, val_on_test=True, **kw)
    assert spy.used and h.val_clean_acc[0] is not None
    spy, val = _Spy(te), _Spy(te)
    h = fit(model, {"train": tr, "val": val, "test": spy}, **kw)
    assert val.used and not spy.used and h.val_clean_acc[0] is not None
    h = fit(model, {"train": tr}, **kw)
    assert h.val_clean_acc == [None]


def test_a_bare_train_loader_trains_without_validation():
    model, (tr, _) = _tiny(seed=2)
    ref = copy.deepcopy(model)
    h = fit(model, tr, "natural", epochs=2, progress=False, max_batches=2)
    assert len(h) == 2 and h.val_clean_acc == [None, None] and h.val_pgd_acc == [None, None]
    # the same run as an explicit (train, None) pair
    _, (tr2, _) = _tiny(seed=2)
    fit(ref, (tr2, None), "natural", epochs=2, progress=False, max_batches=2)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
