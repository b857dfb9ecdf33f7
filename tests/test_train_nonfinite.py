"""fit refuses non-finite models: a NaN start, divergence during training and a NaN
checkpoint each raise one line naming where, and the last good checkpoint is kept."""

from __future__ import annotations

import copy

import pytest
import torch

from sparse_adv_fast import checkpoint as ckpt_io
from sparse_adv_fast import data, models
from sparse_adv_fast.finite import NonFiniteError
from sparse_adv_fast.train import fit

KW = dict(schedule="none", progress=False, max_batches=1)


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = models.build("small_cnn", "digits", width=0.5)
    train, _ = data.loaders("digits", batch_size=16, train_subset=32, test_subset=16, seed=seed)
    return model, train


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_a_nan_model_is_refused_before_training():
    model, train = _tiny()
    last = f"{len(model) - 1}.bias"
    with torch.no_grad():
        model[-1].bias[3] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteError, match=rf"model given to fit.*{last}") as e:
        fit(model, train, epochs=1, **KW)
    _one_line(e)
    # nothing trained: the other weights are untouched
    for k, v in before.items():
        assert k == last or torch.equal(model.state_dict()[k], v), k


def test_divergence_raises_naming_the_epoch_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "run.pt"
    model, train = _tiny()
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def keep(epoch, history):
        snapshots[epoch] = copy.deepcopy(model.state_dict())

    # lr 1e6 on this model: epochs 1-2 end finite (loss ~1e19), epoch 3's loss is inf/NaN
    with pytest.raises(NonFiniteError, match=r"training loss became non-finite in epoch 3 "
                                             r"\(by iteration 3; first non-finite tensor "
                                             r"1\.weight\)") as e:
        fit(model, train, epochs=6, lr=1e6, checkpoint=path, callback=keep, **KW)
    _one_line(e)
    assert sorted(snapshots) == [1, 2]
    saved = ckpt_io.load(path)
    assert saved["epoch"] == 2  # the last good one, not overwritten by epoch 3's state
    for k, v in snapshots[2].items():
        assert torch.equal(saved["model"][k], v), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_weights_overflowing_behind_a_finite_loss_are_caught_before_any_save(tmp_path):
    path = tmp_path / "run.pt"
    model, train = _tiny()
    # One SGD step: grad + 1e38 * w is finite, but 1e38 x that overflows to inf; the loss
    # was computed before the step and is finite.
    with pytest.raises(NonFiniteError, match=r"weights became non-finite in epoch 1 "
                                             r"\(by iteration 1\).*non-finite values") as e:
        fit(model, train, epochs=2, lr=1e38, weight_decay=1e38, momentum=0.0,
            checkpoint=path, **KW)
    _one_line(e)
    assert not path.exists()


@pytest.mark.parametrize("part", ["model", "rewind_state"])
def test_a_nan_checkpoint_at_its_final_epoch_is_refused_and_kept(tmp_path, part):
    path = tmp_path / "run.pt"
    model, train = _tiny()
    fit(model, train, epochs=2, rewind_at=1, checkpoint=path, **KW)
    saved = ckpt_io.load(path)
    assert saved["epoch"] == 2 and saved["rewind_state"] is not None
    saved[part]["3.weight"][0, 0] = float("nan")  # hand-made, as a disk or bug would
    ckpt_io.save_atomic(saved, path)
    raw = path.read_bytes()

    fresh, _ = _tiny(seed=1)  # another init; the same data order
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(NonFiniteError, match=rf"refusing to resume from checkpoint "
                                             rf"{path}.*non-finite values.* in 3\.weight") as e:
        fit(fresh, train, epochs=2, rewind_at=1, checkpoint=path, **KW)
    _one_line(e)
    assert path.read_bytes() == raw
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
