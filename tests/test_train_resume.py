"""Checkpoint/resume through fit: a killed run resumes to the uninterrupted result, and
bad checkpoints are errors, never a silent restart."""

from __future__ import annotations

import copy

import pytest
import torch

from sparse_adv_fast import checkpoint as ckpt_io
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


# ---- resume refuses changed settings -------------------------------------------------------
BASE = dict(epochs=4, lr=0.05, steps=2, eps=0.1, progress=False, max_batches=1, val_batches=1,
            val_steps=1)


@pytest.fixture(scope="module")
def pgd_checkpoint(tmp_path_factory):
    """A PGD-AT run with BASE settings killed after epoch 1 (built once for the module)."""
    path = tmp_path_factory.mktemp("changed") / "run.pt"
    model, loaders = _tiny()
    with pytest.raises(_Killed):
        fit(model, loaders, "pgd", checkpoint=path, callback=_kill_after(1), **BASE)
    return path


def _digits(batch_size=16, train_subset=64, seed=0):
    return data.loaders("digits", batch_size=batch_size, train_subset=train_subset,
                        test_subset=32, seed=seed)


@pytest.mark.parametrize("change, expected", [
    (dict(epochs=6), "epochs=4, now epochs=6"),
    (dict(method="trades"), "method='pgd', now method='trades'"),
    (dict(optimizer="adam"), "optimizer='sgd', now optimizer='adam'"),
    (dict(lr=0.1), "lr=0.05, now lr=0.1"),
    (dict(momentum=0.5), "momentum=0.9, now momentum=0.5"),
    (dict(weight_decay=0.0), "weight_decay=0.0005, now weight_decay=0.0"),
    (dict(schedule="step"), "schedule='cosine', now schedule='step'"),
    (dict(eps=0.2), "eps=0.1, now eps=0.2; alpha=0.025, now alpha=0.05"),  # alpha = eps/4
    (dict(alpha=0.01), "alpha=0.025, now alpha=0.01"),
    (dict(steps=3), "steps=2, now steps=3"),
    (dict(norm="l2"), "norm='linf', now norm='l2'"),
    (dict(seed=7), "seed=0, now seed=7"),
    (dict(loaders=_digits(seed=3)), "seed=0, now seed=3"),
    (dict(loaders=_digits(batch_size=8)), "batch_size=16, now batch_size=8"),
    (dict(loaders=_digits(train_subset=48)), "train_size=64, now train_size=48"),
    (dict(max_batches=2), "max_batches=1, now max_batches=2"),
    (dict(rewind_at=1), "rewind_at=None, now rewind_at=1"),
    (dict(co_check=False), "co_check=True, now co_check=False"),
    (dict(val_steps=2), "val_steps=1, now val_steps=2"),
    (dict(loaders=(_digits()[0], None)), "validation=True, now validation=False"),
])
def test_resume_refuses_each_changed_setting(pgd_checkpoint, change, expected):
    raw = pgd_checkpoint.read_bytes()
    model, _ = _tiny(seed=1)  # another init: the checkpoint must not be loaded into it
    loaders = change.pop("loaders", _digits())
    method = change.pop("method", "pgd")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError) as e:
        fit(model, loaders, method, checkpoint=pgd_checkpoint, **{**BASE, **change})
    msg = str(e.value)
    assert msg == (f"checkpoint {pgd_checkpoint} was written with {expected}; resume with the "
                   "same settings, or pass resume=False (or delete the file) to start over")
    assert pgd_checkpoint.read_bytes() == raw
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_resume_lists_every_difference_and_the_same_settings_still_resume(pgd_checkpoint):
    model, _ = _tiny(seed=1)
    loaders = _digits()
    with pytest.raises(CheckpointError, match=r"written with epochs=4, now epochs=6; lr=0\.05, "
                                              r"now lr=0\.2; resume with the same settings"):
        fit(model, loaders, "pgd", checkpoint=pgd_checkpoint, **{**BASE, "epochs": 6,
                                                                 "lr": 0.2})
    h = fit(model, loaders, "pgd", checkpoint=pgd_checkpoint, **BASE)
    assert h.resumed_from_epoch == 1 and len(h) == 4


def test_a_checkpoint_of_the_older_format_is_refused_with_advice(tmp_path):
    path = tmp_path / "run.pt"
    model, loaders = _tiny()
    fit(model, loaders, "natural", checkpoint=path, **KW)
    saved = ckpt_io.load(path)
    saved["format"] = "sparse_adv_fast.fit/1"
    saved["config"] = {"optimizer": "sgd", "schedule": "cosine"}
    ckpt_io.save_atomic(saved, path)
    with pytest.raises(CheckpointError, match="older format.*resume=False"):
        fit(model, loaders, "natural", checkpoint=path, **KW)


# ---- the data order is a function of (seed, epoch), not of a generator's history -----------
def _train(loaders, **kw):
    model, _ = _tiny()
    torch.manual_seed(0)
    fit(model, loaders[0], "natural", **{**KW, "max_batches": 3, **kw})  # no validation
    return model.state_dict()


def test_data_order_does_not_depend_on_what_a_cached_loader_drew_before():
    fresh = _train(_digits())
    cached = _digits()
    for _ in range(3):  # an earlier stage consumed the loader's generator
        list(cached[0])
    state = cached[0].generator.get_state()
    used = _train(cached)
    for k, v in fresh.items():
        assert torch.equal(used[k], v), k
    assert torch.equal(cached[0].generator.get_state(), state)  # given back as it came


def test_data_order_is_drawn_from_the_seed_argument():
    # the whole train split, so that the loader seed changes only the generator's seed
    a = _train(_digits(train_subset=None, seed=0), seed=7)
    b = _train(_digits(train_subset=None, seed=4), seed=7)  # overridden by seed=7
    c = _train(_digits(train_subset=None, seed=0), seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_seed_without_a_loader_generator_is_an_error_not_ignored():
    from torch.utils.data import DataLoader

    train = _digits()[0]
    plain = DataLoader(train.dataset, batch_size=16, shuffle=True)  # global-RNG shuffle
    model, _ = _tiny()
    with pytest.raises(ValueError, match="seed=3 sets the data order.*no torch.Generator"):
        fit(model, plain, seed=3, **KW)
