"""Datasets from local files in their standard formats; nothing is downloaded.

* ``digits``: scikit-learn's bundled 8x8 digits (embedded, the default), split 80/20
  stratified with a fixed seed.
* ``mnist``: the four IDX files (optionally ``.gz``) in ``data_dir`` or ``data_dir/MNIST/raw``.
* ``cifar10``: the python pickles ``data_batch_1..5`` and ``test_batch`` in
  ``data_dir/cifar-10-batches-py`` or ``data_dir`` itself.

Inputs are float32 ``(N, C, H, W)`` in [0, 1] and labels int64. Normalisation is not
applied here: it is the model's first layer (``saf.nn.Normalize``), so attacks see [0, 1].
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

DATASETS = ("digits", "mnist", "cifar10")
DATA_DIR_ENV = "SPARSE_ADV_FAST_DATA"

_INFO: dict[str, dict[str, Any]] = {
    # digits statistics measured on the whole bundled set scaled to [0, 1]
    "digits": dict(in_channels=1, image_size=8, num_classes=10, mean=(0.3053,), std=(0.3760,)),
    "mnist": dict(in_channels=1, image_size=28, num_classes=10, mean=(0.1307,), std=(0.3081,)),
    "cifar10": dict(
        in_channels=3, image_size=32, num_classes=10,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    ),
}

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _check_name(name: str) -> str:
    if name not in _INFO:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    return name


def info(name: str) -> dict[str, Any]:
    """``dict(in_channels, image_size, num_classes, mean, std)`` of dataset ``name``."""
    d = _INFO[_check_name(name)]
    return {k: (tuple(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV, "data")
    return Path(data_dir).expanduser()


# ---- digits -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=0.2, stratify=y, random_state=0))


def _load_digits() -> tuple[TensorDataset, TensorDataset]:
    x_tr, x_te, y_tr, y_te = _digits_arrays()
    return (
        TensorDataset(torch.from_numpy(x_tr.copy()), torch.from_numpy(y_tr.copy())),
        TensorDataset(torch.from_numpy(x_te.copy()), torch.from_numpy(y_te.copy())),
    )


# ---- MNIST (IDX) ------------------------------------------------------------------------
def _find_file(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with ``ndim`` dimensions (3 for images, 1 for labels)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # truncated / not gzip
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"malformed IDX file {path}: only {len(raw)} bytes, header incomplete")
    zero, dtype_code, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or dims != ndim:
        raise ValueError(
            f"malformed IDX file {path}: expected magic 0x0000080{ndim} (unsigned byte, "
            f"{ndim}-d), got 0x{zero:04x}{dtype_code:02x}{dims:02x}"
        )
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    n = int(np.prod(shape))
    body = raw[4 + 4 * ndim :]
    if len(body) != n:
        raise ValueError(
            f"malformed IDX file {path}: header says shape {shape} ({n} bytes), "
            f"found {len(body)} bytes of data"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _load_mnist(data_dir: Path) -> tuple[TensorDataset, TensorDataset]:
    folders = [data_dir, data_dir / "MNIST" / "raw"]
    for folder in folders:
        found = {k: _find_file(folder, v) for k, v in MNIST_FILES.items()}
        if all(found.values()):
            break
    else:
        raise FileNotFoundError(
            f"MNIST files not found: expected {', '.join(MNIST_FILES.values())} (each "
            f"optionally .gz) in one of: {', '.join(str(f) for f in folders)}"
        )
    arrays = {k: _read_idx(p, 3 if k.endswith("images") else 1) for k, p in found.items()}
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"malformed MNIST {split} split in {folder}: {x.shape[0]} images but "
                f"{y.shape[0]} labels"
            )
        if y.size and int(y.max()) > 9:
            raise ValueError(f"malformed MNIST labels in {found[f'{split}_labels']}: label > 9")
        xt = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
        out.append(TensorDataset(xt, torch.from_numpy(y.astype(np.int64))))
    return out[0], out[1]


# ---- CIFAR-10 (python pickles) ----------------------------------------------------------
def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # truncated or not a pickle: many exception types are possible
        raise ValueError(f"cannot read CIFAR-10 batch {path}: {type(e).__name__}: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"malformed CIFAR-10 batch {path}: expected a dict, got {type(d)}")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"malformed CIFAR-10 batch {path}: needs 'data' and 'labels' keys")
    x = np.asarray(d["data"])
    y = np.asarray(d["labels"], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"malformed CIFAR-10 batch {path}: 'data' must be uint8 of shape (N, 3072), "
            f"got {x.dtype} {x.shape}"
        )
    if y.shape != (x.shape[0],) or (y.size and (y.min() < 0 or y.max() > 9)):
        raise ValueError(
            f"malformed CIFAR-10 batch {path}: 'labels' must be {x.shape[0]} ints in 0..9"
        )
    return x.reshape(-1, 3, 32, 32), y


def _load_cifar10(data_dir: Path) -> tuple[TensorDataset, TensorDataset]:
    folders = [data_dir / "cifar-10-batches-py", data_dir]
    for folder in folders:
        if all((folder / f).is_file() for f in CIFAR_FILES):
            break
    else:
        raise FileNotFoundError(
            f"CIFAR-10 files not found: expected {', '.join(CIFAR_FILES)} in one of: "
            f"{', '.join(str(f) for f in folders)}"
        )
    parts = [_read_cifar_batch(folder / f) for f in CIFAR_FILES]
    x_tr = np.concatenate([p[0] for p in parts[:5]])
    y_tr = np.concatenate([p[1] for p in parts[:5]])
    x_te, y_te = parts[5]

    def ds(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y))

    return ds(x_tr, y_tr), ds(x_te, y_te)


# ---- public API -------------------------------------------------------------------------
def load(
    name: str, data_dir: str | os.PathLike | None = None
) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` TensorDatasets of ``(x float32 in [0, 1], y int64)``.

    ``data_dir`` (for ``mnist`` / ``cifar10``; default ``$SPARSE_ADV_FAST_DATA`` or
    ``./data``) is searched as described in the module docstring. A missing file raises
    ``FileNotFoundError`` and a malformed one ``ValueError``, both naming what was expected
    and where.
    """
    _check_name(name)
    if name == "digits":
        return _load_digits()
    root = _data_dir(data_dir)
    return _load_mnist(root) if name == "mnist" else _load_cifar10(root)


def _subset(ds: TensorDataset, n: int | None, seed: int, what: str):
    if n is None:
        return ds
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{what} must be a positive int or None, got {n!r}")
    n = min(n, len(ds))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].sort().values
    return Subset(ds, idx.tolist())


def _check_loader_args(batch_size: int, num_workers: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")


def _ordered(ds: Any, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _shuffled(ds: Any, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=True, generator=gen, num_workers=num_workers
    )


def _datasets(name: str, data_dir: Any, train_subset: int | None, test_subset: int | None,
              seed: int, batch_size: int, num_workers: int) -> tuple[Any, Any]:
    """Checked arguments, then the (sub-sampled) train and test datasets."""
    _check_loader_args(batch_size, num_workers)
    _subset(TensorDataset(torch.zeros(1)), train_subset, seed, "train_subset")  # validate
    _subset(TensorDataset(torch.zeros(1)), test_subset, seed, "test_subset")
    train, test = load(name, data_dir)
    return (_subset(train, train_subset, seed, "train_subset"),
            _subset(test, test_subset, seed + 1, "test_subset"))


def loaders(
    name: str,
    *,
    batch_size: int = 128,
    data_dir: str | os.PathLike | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` for dataset ``name``.

    The train loader shuffles with its own generator seeded by ``seed`` (so the order does
    not depend on the global RNG, and ``fit`` checkpoints it); the test loader keeps order.
    ``train_subset`` / ``test_subset`` take a seeded random subset of that many samples.
    """
    train, test = _datasets(name, data_dir, train_subset, test_subset, seed, batch_size,
                            num_workers)
    return (_shuffled(train, batch_size, num_workers, seed),
            _ordered(test, batch_size, num_workers))


def split_loaders(
    name: str,
    *,
    val_size: int | float,
    batch_size: int = 128,
    data_dir: str | os.PathLike | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """``(train_loader, val_loader, test_loader)``: ``val_size`` training samples (a count,
    or a fraction in (0, 1); a seeded random choice) are held out for validation, so model
    selection and the catastrophic-overfitting check never look at the test split. Other
    arguments as :func:`loaders`.
    """
    train, test = _datasets(name, data_dir, train_subset, test_subset, seed, batch_size,
                            num_workers)
    given = val_size
    if isinstance(val_size, float) and 0.0 < val_size < 1.0:
        val_size = max(1, round(val_size * len(train)))
    if not isinstance(val_size, int) or isinstance(val_size, bool) or not 0 < val_size < len(train):
        raise ValueError(
            f"val_size must be an int in [1, {len(train) - 1}] or a fraction in (0, 1) for "
            f"{name}, got {given!r}"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 2))
    val = Subset(train, order[:val_size].sort().values.tolist())
    train = Subset(train, order[val_size:].sort().values.tolist())
    return (_shuffled(train, batch_size, num_workers, seed),
            _ordered(val, batch_size, num_workers),
            _ordered(test, batch_size, num_workers))


__all__ = ["DATASETS", "info", "load", "loaders", "split_loaders"]
