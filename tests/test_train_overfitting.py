"""Catastrophic-overfitting detection: the detector's rule and fit's roll-back, driven by
injected validation accuracies rather than by provoking a real collapse."""

from __future__ import annotations

import copy

import pytest
import torch

from sparse_adv_fast import data, models
from sparse_adv_fast.train import OverfitDetector, fit


def _feed(det: OverfitDetector, accs: list[float]) -> int | None:
    for epoch, acc in enumerate(accs, start=1):
        if det.update(epoch, acc):
            return epoch
    return None


def test_detector_rule():
    assert _feed(OverfitDetector(), [0.30, 0.42, 0.45, 0.41, 0.12]) == 5
    # a fall that is relatively sharp but small in absolute terms is noise
    assert _feed(OverfitDetector(), [0.04, 0.10, 0.01]) is None
    # a large absolute fall that keeps more than half the best is not a collapse
    assert _feed(OverfitDetector(), [0.80, 0.55]) is None
    # thresholds are parameters
    assert _feed(OverfitDetector(ratio=0.8, drop=0.1), [0.80, 0.55]) == 2
    det = OverfitDetector()
    _feed(det, [0.3, 0.5, 0.5, 0.4])
    assert det.best_epoch == 3 and det.best_acc == 0.5  # ties go to the later epoch
    with pytest.raises(ValueError, match="ratio"):
        OverfitDetector(ratio=2.0)


def _scripted(accs: list[float]):
    calls = []

    def probe(model, epoch):
        calls.append(epoch)
        return accs[epoch - 1]
    return probe, calls


def _tiny():
    torch.manual_seed(0)
    model = models.build("small_cnn", "digits", width=0.5)
    loaders = data.loaders("digits", batch_size=16, train_subset=32, test_subset=16)
    return model, loaders


KW = dict(lr=0.05, steps=1, progress=False, max_batches=1)


def test_fit_rolls_back_and_stops_on_collapse(tmp_path):
    model, loaders = _tiny()
    probe, calls = _scripted([0.40, 0.45, 0.44, 0.05, 0.50, 0.50])
    states = {}

    def keep(epoch, history):
        states[epoch] = copy.deepcopy(model.state_dict())

    logs: list[str] = []
    path = tmp_path / "co.pt"
    h = fit(model, loaders, "fgsm_rs", epochs=6, co_probe=probe, callback=keep, log=logs.append,
            checkpoint=path, **KW)
    assert calls == [1, 2, 3, 4]  # stopped at the collapse
    assert h.co_detected_epoch == 4 and h.rolled_back
    assert h.best_epoch == 2 and h.best_val_pgd_acc == pytest.approx(0.45)
    assert h.val_pgd_acc == [0.40, 0.45, 0.44, 0.05]
    for k, v in states[2].items():  # the model is the best epoch's, not the last one's
        assert torch.equal(model.state_dict()[k], v), k
    assert not all(torch.equal(states[3][k], v) for k, v in states[2].items())
    assert any("catastrophic overfitting at epoch 4" in m for m in logs)
    assert h.as_dict()["co_detected_epoch"] == 4
    # resuming a stopped run does not train on
    model2, loaders2 = _tiny()
    h2 = fit(model2, loaders2, "fgsm_rs", epochs=6, co_probe=probe, checkpoint=path, **KW)
    assert h2.co_detected_epoch == 4 and len(h2) == 4 and calls == [1, 2, 3, 4]
    for k, v in states[2].items():
        assert torch.equal(model2.state_dict()[k], v), k


def test_co_check_off_or_natural_never_stops():
    probe, calls = _scripted([0.9, 0.0, 0.0])
    model, loaders = _tiny()
    h = fit(model, loaders, "fgsm_rs", epochs=3, co_probe=probe, co_check=False, **KW)
    assert len(h) == 3 and h.co_detected_epoch is None and not h.rolled_back
    assert h.val_pgd_acc == [0.9, 0.0, 0.0]  # still measured and recorded
    probe, _ = _scripted([0.9, 0.0, 0.0])
    h = fit(model, loaders, "natural", epochs=3, co_probe=probe, **KW)
    assert len(h) == 3 and h.co_detected_epoch is None
