"""Checkpoint/resume through fit: a killed run resumes to the uninterrupted result, and
bad checkpoints are errors, never a silent restart."""

from __future__ import annotations

import copy

import pytest
import torch

from sparse_adv_fast import data, models
from sparse_adv_fast.train import CheckpointError, fit

KW = dict(epochs=2, lr=0.05, steps=2, progress=False, max_batches=2, val_batches=1,
          val_steps=1)


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = models.build("small_cnn", "digits", width=0.5)
    loaders = data.loaders("digits", batch_size=16, train_subset=64, test_subset=32, seed=seed)
    return model, loaders


class _Killed(Exception):
    pass


def _kill_after(epoch: int):
    def cb(e, history):
        if e == epoch:
            raise _Killed
    return cb


@pytest.mark.parametrize("method", ["natural", "fgsm_rs"])
def test_resume_matches_uninterrupted_run(tmp_path, method):
    model, loaders = _tiny()
    init = copy.deepcopy(model.state_dict())
    straight = fit(model, loaders, method, **KW)

    path = tmp_path / "run.pt"
    model2, loaders2 = _tiny()
    model2.load_state_dict(init)
    with pytest.raises(_Killed):
        fit(model2, loaders2, method, checkpoint=path, callback=_kill_after(1), **KW)
    assert path.exists()

    # a fresh process: new model (different init), new loaders, a scrambled global RNG
    model3, loaders3 = _tiny(seed=5)
    loaders3 = data.loaders("digits", batch_size=16, train_subset=64, test_subset=32, seed=0)
    torch.manual_seed(999)
    resumed = fit(model3, loaders3, method, checkpoint=path, **KW)
    assert resumed.resumed_from_epoch == 1 and len(resumed) == 2
    for k, v in model.state_dict().items():
        assert torch.equal(model3.state_dict()[k], v), k
    for a, b in zip(straight.epochs, resumed.epochs, strict=True):
        assert {k: v for k, v in a.items() if k != "time"} == \
               {k: v for k, v in b.items() if k != "time"}
    assert resumed.iterations == straight.iterations
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_finished_checkpoint_resumes_to_nothing_and_resume_false_restarts(tmp_path):
    path = tmp_path / "run.pt"
    model, loaders = _tiny()
    fit(model, loaders, "natural", checkpoint=path, **KW)
    done = copy.deepcopy(model.state_dict())
    model2, _ = _tiny(seed=3)
    h = fit(model2, loaders, "natural", checkpoint=path, **KW)
    assert len(h) == 2 and h.resumed_from_epoch == 2
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in done.items())
    model3, loaders3 = _tiny(seed=3)
    h3 = fit(model3, loaders3, "natural", checkpoint=path, resume=False,
             **{**KW, "epochs": 1})
    assert h3.resumed_from_epoch is None and len(h3) == 1


def test_corrupt_checkpoint_is_an_error_not_a_restart(tmp_path):
    path = tmp_path / "run.pt"
    model, loaders = _tiny()
    fit(model, loaders, "natural", checkpoint=path, **{**KW, "epochs": 1})
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    model2, _ = _tiny()
    before = copy.deepcopy(model2.state_dict())
    with pytest.raises(CheckpointError, match="run.pt"):
        fit(model2, loaders, "natural", checkpoint=path, **KW)
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in before.items())
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="run.pt"):
        fit(model2, loaders, "natural", checkpoint=path, **KW)


def test_checkpoint_from_another_model_or_method(tmp_path):
    path = tmp_path / "run.pt"
    model, loaders = _tiny()
    fit(model, loaders, "natural", checkpoint=path, **{**KW, "epochs": 1})
    wider = models.build("small_cnn", "digits", width=1)
    with pytest.raises(CheckpointError, match=r"different model.*shape mismatch.*1\.weight"):
        fit(wider, loaders, "natural", checkpoint=path, **KW)
    other = models.build("mlp", "digits", width=0.25)
    with pytest.raises(CheckpointError, match="missing keys"):
        fit(other, loaders, "natural", checkpoint=path, **KW)
    with pytest.raises(CheckpointError, match="method='natural'"):
        fit(models.build("small_cnn", "digits", width=0.5), loaders, "pgd", checkpoint=path,
            **KW)
    torch.save({"something": 1}, path)
    with pytest.raises(CheckpointError, match="not a sparse_adv_fast fit checkpoint"):
        fit(model, loaders, "natural", checkpoint=path, **KW)


def test_checkpoint_from_another_optimizer(tmp_path):
    path = tmp_path / "run.pt"
    model, loaders = _tiny()
    fit(model, loaders, "natural", checkpoint=path, **{**KW, "epochs": 1})
    model2, loaders2 = _tiny(seed=1)
    before = copy.deepcopy(model2.state_dict())
    with pytest.raises(CheckpointError, match="optimizer='sgd'"):
        fit(model2, loaders2, "natural", checkpoint=path, optimizer="adam", **KW)
    with pytest.raises(CheckpointError, match="schedule='cosine'"):
        fit(model2, loaders2, "natural", checkpoint=path, schedule="step", **KW)
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in before.items())
