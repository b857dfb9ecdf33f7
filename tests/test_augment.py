"""CIFAR augmentation (random crop with 4-pixel padding + horizontal flip) on tensors:
against a per-sample loop over plain slicing, training split only, reproducible from the
seed, and exact through a fit resume."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sparse_adv_fast as saf
from sparse_adv_fast import data, models
from sparse_adv_fast.train import fit


def _oracle(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int):
    """One sample at a time: zero-pad, slice the crop, mirror the columns if flipped."""
    out = []
    h, w = x.shape[-2:]
    for img, (oy, ox), f in zip(x, offsets.tolist(), flips.tolist(), strict=True):
        p = F.pad(img, (pad, pad, pad, pad))
        crop = p[:, oy:oy + h, ox:ox + w]
        out.append(crop[:, :, torch.arange(w - 1, -1, -1)] if f else crop)
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(5, 3, 32, 32), (1, 1, 8, 6), (7, 2, 5, 9)])
def test_augment_batch_matches_per_sample_crop_and_flip(shape):
    x = torch.rand(shape)
    g = torch.Generator().manual_seed(3)
    got = data.augment_batch(x, g)
    # The documented draw order: offsets (N, 2) in [0, 2 * pad], then flip bits (N,).
    g2 = torch.Generator().manual_seed(3)
    offsets = torch.randint(0, 9, (shape[0], 2), generator=g2)
    flips = torch.randint(0, 2, (shape[0],), generator=g2)
    assert torch.equal(got, _oracle(x, offsets, flips, 4))


def test_augment_batch_options_and_checks():
    x = torch.rand(4, 3, 6, 6)
    assert torch.equal(data.augment_batch(x, padding=0, flip=False), x)
    flipped = data.augment_batch(x, torch.Generator().manual_seed(0), padding=0)
    for a, b in zip(flipped, x, strict=True):  # each sample: itself or its mirror image
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        data.augment_batch(x, padding=-1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        data.augment_batch(x[0])


def _write_cifar(folder, n=12):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name in data.CIFAR_FILES:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)


def _flat(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_augmented_cifar_loader_training_split_only_and_seeded(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    kw = dict(val_size=8, batch_size=16, data_dir=tmp_path, seed=5)
    tr, val, te = data.split_loaders("cifar10", augment=True, **kw)
    tr0, val0, te0 = data.split_loaders("cifar10", **kw)
    # Validation and test are never augmented.
    for a, b in ((val, val0), (te, te0)):
        assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b, strict=True))
    # The same seed gives the same augmented batches; a training batch differs from its
    # plain counterpart only by crop/flip (same labels, same order).
    first = _flat(tr)
    again = _flat(data.split_loaders("cifar10", augment=True, **kw)[0])
    plain = _flat(tr0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, again, strict=True))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, plain, strict=True))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, plain, strict=True))
    other = _flat(data.split_loaders("cifar10", augment=True, **{**kw, "seed": 6})[0])
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))
    with pytest.raises(ValueError, match="augment must be True or False"):
        data.loaders("cifar10", data_dir=tmp_path, augment="yes")


def test_fit_resume_is_exact_with_augmentation(tmp_path):
    saf.backends.use("torch")  # the loop is under test, not the kernels (no autotuning)

    def run(path, kill):
        torch.manual_seed(0)
        model = models.build("small_cnn", "digits", width=0.5)
        tr, te = data.loaders("digits", batch_size=32, train_subset=64, test_subset=32,
                              seed=1, augment=True)
        kw = dict(epochs=2, lr=0.05, progress=False, checkpoint=path)
        if kill:
            def stop(epoch, _):
                raise KeyboardInterrupt

            with pytest.raises(KeyboardInterrupt):
                fit(model, (tr, te), "natural", callback=stop, **kw)
            torch.manual_seed(123)  # a restarted process: other global RNG state
            model = models.build("small_cnn", "digits", width=0.5)
        fit(model, (tr, te), "natural", **kw)
        return model.state_dict()

    straight = run(tmp_path / "a.pt", kill=False)
    resumed = run(tmp_path / "b.pt", kill=True)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
