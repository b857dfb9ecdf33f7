"""Datasets: digits (embedded), MNIST IDX and CIFAR-10 pickles from fake files in tmp_path."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from sparse_adv_fast import data


# ---- fake files -------------------------------------------------------------------------
def _idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_mnist(folder, rng, n_train=5, n_test=3, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        raw = _idx_bytes(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


def _write_cifar(folder, rng, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in data.CIFAR_FILES:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
        batches[name] = d
    return batches


# ---- digits -----------------------------------------------------------------------------
def test_digits_shapes_ranges_and_stratified_split():
    train, test = data.load("digits")
    x_tr, y_tr = train.tensors
    x_te, y_te = test.tensors
    assert x_tr.shape[1:] == (1, 8, 8) and x_te.shape[1:] == (1, 8, 8)
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(x_tr.min()) == 0.0 and float(x_tr.max()) == 1.0
    # sklearn stores 0..16 counts; scaled by 1/16 every value is a multiple of 1/16
    assert torch.equal(x_tr * 16, (x_tr * 16).round())
    counts_tr = torch.bincount(y_tr, minlength=10).float() / len(y_tr)
    counts_te = torch.bincount(y_te, minlength=10).float() / len(y_te)
    assert (counts_tr - counts_te).abs().max() < 0.01
    again = data.load("digits")[0].tensors[0]
    assert torch.equal(again, x_tr)


def test_info_and_unknown_names():
    d = data.info("cifar10")
    assert (d["in_channels"], d["image_size"], d["num_classes"]) == (3, 32, 10)
    assert len(d["mean"]) == len(d["std"]) == 3
    assert data.info("digits")["image_size"] == 8
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        data.info("svhn")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet")


def test_digits_stats_match_data():
    x = torch.cat([data.load("digits")[0].tensors[0], data.load("digits")[1].tensors[0]])
    d = data.info("digits")
    assert abs(float(x.mean()) - d["mean"][0]) < 1e-3
    assert abs(float(x.std()) - d["std"][0]) < 1e-3


# ---- MNIST ------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["flat", "torchvision", "gz"])
def test_mnist_reads_idx(tmp_path, layout):
    rng = np.random.default_rng(0)
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = _write_mnist(folder, rng, gz=layout == "gz")
    train, test = data.load("mnist", tmp_path)
    x, y = train.tensors
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255.0)
    assert torch.equal(x[:, 0], expected)
    assert y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert test.tensors[0].shape == (3, 1, 28, 28)
    assert test.tensors[1].tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_mnist_missing_file_names_expected_files_and_path(tmp_path):
    _write_mnist(tmp_path, np.random.default_rng(0))
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as e:
        data.load("mnist", tmp_path)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg and str(tmp_path) in msg
    assert str(tmp_path / "MNIST" / "raw") in msg


def test_mnist_corrupt_files(tmp_path):
    _write_mnist(tmp_path, np.random.default_rng(0))
    img = tmp_path / "train-images-idx3-ubyte"
    raw = img.read_bytes()
    img.write_bytes(raw[:-7])  # truncated body
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*found"):
        data.load("mnist", tmp_path)
    img.write_bytes(b"\x00\x00\x08\x01" + raw[4:])  # labels magic on an image file
    with pytest.raises(ValueError, match="malformed IDX file .*train-images-idx3-ubyte"):
        data.load("mnist", tmp_path)
    img.write_bytes(raw)
    lab = tmp_path / "train-labels-idx1-ubyte"
    lab.write_bytes(_idx_bytes(np.zeros(4, np.uint8)))  # 5 images, 4 labels
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte holds 5 images but "
                       r".*train-labels-idx1-ubyte holds 4 labels"):
        data.load("mnist", tmp_path)


def test_mnist_truncated_gzip(tmp_path):
    _write_mnist(tmp_path, np.random.default_rng(0), gz=True)
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:30])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        data.load("mnist", tmp_path)


# ---- CIFAR-10 ---------------------------------------------------------------------------
@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_reads_pickles(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    batches = _write_cifar(folder, np.random.default_rng(1))
    train, test = data.load("cifar10", tmp_path)
    x, y = train.tensors
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    first = batches["data_batch_1"][b"data"][0]
    # row layout: 1024 red (row-major 32x32), then 1024 green, then 1024 blue
    assert float(x[0, 0, 0, 1]) == pytest.approx(first[1] / 255.0)
    assert float(x[0, 1, 0, 0]) == pytest.approx(first[1024] / 255.0)
    assert float(x[0, 2, 1, 0]) == pytest.approx(first[2048 + 32] / 255.0)
    assert y[4:8].tolist() == batches["data_batch_2"][b"labels"]
    assert test.tensors[1].tolist() == batches["test_batch"][b"labels"]
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_cifar10_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load("cifar10", tmp_path)
    assert "data_batch_1" in str(e.value) and "test_batch" in str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value)
    _write_cifar(tmp_path, np.random.default_rng(2))
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        data.load("cifar10", tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"data_batch_3.*\(N, 3072\)"):
        data.load("cifar10", tmp_path)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    _write_mnist(tmp_path, np.random.default_rng(0))
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert len(data.load("mnist")[0]) == 5


# ---- loaders ----------------------------------------------------------------------------
def test_loaders_subsets_and_seeded_order():
    tr, te = data.loaders("digits", batch_size=16, train_subset=40, test_subset=20, seed=3)
    assert len(tr.dataset) == 40 and len(te.dataset) == 20
    x, y = next(iter(tr))
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)
    tr2, te2 = data.loaders("digits", batch_size=16, train_subset=40, test_subset=20, seed=3)
    torch.manual_seed(123)  # the shuffle must not depend on the global RNG
    assert torch.equal(next(iter(tr2))[1], y)
    assert torch.equal(next(iter(te))[1], next(iter(te2))[1])
    other, _ = data.loaders("digits", batch_size=16, train_subset=40, seed=4)
    assert not torch.equal(next(iter(other))[1], y)


def test_loaders_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        data.loaders("digits", batch_size=0)
    with pytest.raises(ValueError, match="train_subset"):
        data.loaders("digits", train_subset=-5)


def test_split_loaders_hold_out_validation_from_train_only():
    train, val, test = data.split_loaders("digits", val_size=100, batch_size=512, seed=3)
    full_train, full_test = data.load("digits")
    xs_train = torch.cat([x for x, _ in train])
    xs_val = torch.cat([x for x, _ in val])
    xs_test = torch.cat([x for x, _ in test])
    assert len(xs_val) == 100 and len(xs_train) == len(full_train) - 100
    assert torch.equal(xs_test, full_test.tensors[0])
    # train and val partition the training split: every training image is in exactly one
    key = lambda t: {tuple(r.flatten().tolist()) for r in t}  # noqa: E731
    assert key(xs_train) | key(xs_val) == key(full_train.tensors[0])
    assert len(xs_train) + len(xs_val) == len(full_train)
    again = data.split_loaders("digits", val_size=100, batch_size=512, seed=3)[1]
    assert torch.equal(torch.cat([x for x, _ in again]), xs_val)
    with pytest.raises(ValueError, match="val_size must be an int"):
        data.split_loaders("digits", val_size=0)


def test_split_loaders_accepts_a_fraction():
    train, val, _ = data.split_loaders("digits", val_size=0.1, batch_size=4096)
    n_train = len(data.load("digits")[0])
    assert len(next(iter(val))[0]) == round(0.1 * n_train)
    assert len(next(iter(train))[0]) == n_train - round(0.1 * n_train)
