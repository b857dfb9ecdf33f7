"""Datasets from local files in their standard formats; nothing is downloaded.

* ``digits``: scikit-learn's bundled 8x8 digits (embedded, the default), split 80/20
  stratified with a fixed seed.
* ``mnist``: the four IDX files (optionally ``.gz``) in ``data_dir`` or ``data_dir/MNIST/raw``.
* ``cifar10``: the python pickles ``data_batch_1..5`` and ``test_batch`` in
  ``data_dir/cifar-10-batches-py`` or ``data_dir`` itself.

Inputs are float32 ``(N, C, H, W)`` in [0, 1] and labels int64. Normalisation is not
applied here: it is the model's first layer (``saf.nn.Normalize``), so attacks see [0, 1].

Every problem with a dataset's files raises :class:`DataError` (a ``ValueError``; missing
files raise its subclass :class:`DataFilesNotFound`, also a ``FileNotFoundError``) with a
one-line message naming the file. The CIFAR-10 pickles are read with a restricted unpickler
that admits only what the format holds, so a crafted batch cannot run code.
"""

from __future__ import annotations

import functools
import gzip
import math
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
MNIST_SIDE = 28
# Real MNIST train images are 47 MB; the cap bounds what a forged IDX header (or a gzip
# bomb behind one) can make the reader allocate.
IDX_MAX_BYTES = 1 << 32


class DataError(ValueError):
    """A dataset's files are missing, malformed or refused; the message names the file.

    One type for every data problem, so a caller (the CLI: exit status 2) can tell bad
    input data from a bug.
    """


class DataFilesNotFound(DataError, FileNotFoundError):
    """A dataset's standard files are not in any of the folders searched."""


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or name not in _INFO:
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


# ---- files ------------------------------------------------------------------------------
def _check_root(data_dir: Path, name: str) -> None:
    """``data_dir`` must be a folder: a file given there is named as such."""
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(
            f"data directory {str(data_dir)!r} for {name} is a file, not a directory; pass "
            "the folder that holds the dataset's standard files"
        )


def _find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz`` if either is a file; a directory there is an
    error (it is where the file is expected, so "not found" would mislead)."""
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
        if cand.is_dir():
            raise DataError(f"{cand} is a directory; expected the data file {cand.name} there")
    return None


# ---- MNIST (IDX) ------------------------------------------------------------------------
def _idx_header(f: Any, path: Path, ndim: int) -> tuple[int, ...]:
    """The shape in an IDX header of unsigned bytes with ``ndim`` dimensions."""
    head = f.read(4 + 4 * ndim)
    if len(head) < 4 + 4 * ndim:
        raise DataError(f"malformed IDX file {path}: only {len(head)} bytes, header incomplete")
    zero, dtype_code, dims = struct.unpack(">HBB", head[:4])
    if zero != 0 or dtype_code != 0x08 or dims != ndim:
        raise DataError(
            f"malformed IDX file {path}: expected magic 0x0000080{ndim} (unsigned byte, "
            f"{ndim}-d), got 0x{zero:04x}{dtype_code:02x}{dims:02x}"
        )
    return struct.unpack(f">{ndim}I", head[4:])


def _check_idx_shape(path: Path, shape: tuple[int, ...]) -> int:
    """The byte count of an MNIST IDX body of ``shape``, after checking the shape."""
    if shape[0] == 0:
        raise DataError(f"empty dataset: IDX file {path} holds 0 samples")
    if len(shape) == 3 and shape[1:] != (MNIST_SIDE, MNIST_SIDE):
        raise DataError(
            f"malformed MNIST images in {path}: expected {MNIST_SIDE}x{MNIST_SIDE} images, "
            f"the header says shape {shape}"
        )
    n = math.prod(shape)  # a Python int: np.prod would overflow on a forged header
    if n > IDX_MAX_BYTES:
        raise DataError(
            f"malformed IDX file {path}: header says shape {shape} ({n} bytes), over the "
            f"{IDX_MAX_BYTES}-byte limit"
        )
    return n


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An MNIST IDX file of unsigned bytes with ``ndim`` dimensions (3 for images, 1 for
    labels); reads at most the size its header claims plus one byte."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            shape = _idx_header(f, path, ndim)
            n = _check_idx_shape(path, shape)
            body = f.read(n + 1)  # one extra byte tells a too-long file from an exact one
    except DataError:
        raise
    except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated / not gzip / unreadable
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(body) != n:
        raise DataError(
            f"malformed IDX file {path}: header says shape {shape} ({n} bytes), "
            f"found {len(body)}{'+' if len(body) > n else ''} bytes of data"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find_mnist(data_dir: Path) -> dict[str, Path]:
    folders = [data_dir, data_dir / "MNIST" / "raw"]
    for folder in folders:
        found = {k: _find_file(folder, v) for k, v in MNIST_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    raise DataFilesNotFound(
        f"MNIST files not found: expected {', '.join(MNIST_FILES.values())} (each "
        f"optionally .gz) in one of: {', '.join(str(f) for f in folders)}"
    )


def _load_mnist(data_dir: Path) -> tuple[TensorDataset, TensorDataset]:
    found = _find_mnist(data_dir)
    arrays = {k: _read_idx(p, 3 if k.endswith("images") else 1) for k, p in found.items()}
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"malformed MNIST {split} split: {found[f'{split}_images']} holds "
                f"{x.shape[0]} images but {found[f'{split}_labels']} holds {y.shape[0]} labels"
            )
        if int(y.max()) > 9:
            raise DataError(f"malformed MNIST labels in {found[f'{split}_labels']}: label > 9")
        xt = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
        out.append(TensorDataset(xt, torch.from_numpy(y.astype(np.int64))))
    return out[0], out[1]


# ---- CIFAR-10 (python pickles, read without running code) -------------------------------
class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle references a global outside the CIFAR format."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _numeric_dtype(dt: Any) -> np.dtype:
    """``dt`` as a plain numeric dtype (bool, int, uint, float); anything else (object,
    structured, sub-array, void) is refused, since only those could smuggle objects or
    sizes the data does not back."""
    if not isinstance(dt, np.dtype):
        dt = np.dtype(dt)
    if dt.kind not in "biuf" or dt.hasobject or dt.fields is not None or dt.subdtype:
        raise _RefusedGlobal(f"numpy dtype {dt!r}")
    return dt


class _CheckedArray(np.ndarray):
    """What ``_reconstruct`` returns: an empty array whose ``__setstate__`` (pickle's BUILD)
    admits only numeric data that the pickle itself holds, byte for byte."""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _RefusedGlobal("numpy array state of unexpected form")
        _, shape, dt, _, raw = state
        _numeric_dtype(dt)
        if not (isinstance(shape, tuple) and all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise _RefusedGlobal(f"numpy array shape {shape!r}")
        if not isinstance(raw, bytes) or len(raw) != math.prod(shape) * dt.itemsize:
            raise _RefusedGlobal(f"numpy array state without the {shape} array's bytes")
        super().__setstate__(state)


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` in a pickle: ``_reconstruct``'s first argument. The class
    itself is never handed out, since calling it allocates any shape the file names."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _RefusedGlobal("numpy.ndarray called directly")


_NDARRAY = _NdarrayToken()


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    # numpy pickles always reconstruct an empty int8 array and fill it by __setstate__;
    # any other shape would allocate before the data is checked.
    if subtype is not _NDARRAY or tuple(shape) != (0,) or typecode not in (b"b", "b"):
        raise _RefusedGlobal(f"numpy _reconstruct{(subtype, shape, typecode)!r}")
    return _CheckedArray((0,), np.int8)


def _frombuffer(buf: Any, dt: Any, shape: Any, order: Any) -> np.ndarray:
    # numpy's own protocol-5 reduction; a view of bytes the pickle holds, never allocates.
    if not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F"):
        raise _RefusedGlobal("numpy _frombuffer of unexpected form")
    return np.frombuffer(buf, dtype=_numeric_dtype(dt)).reshape(shape, order=order)


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    return _numeric_dtype(np.dtype(spec, align=bool(align), copy=bool(copy)))


def _scalar(dt: Any, raw: Any) -> Any:
    # a numpy scalar (e.g. an np.int64 label) from its bytes
    dt = _numeric_dtype(dt)
    if not isinstance(raw, bytes) or len(raw) != dt.itemsize:
        raise _RefusedGlobal("numpy scalar of unexpected form")
    return np.frombuffer(raw, dtype=dt)[0]


def _latin1_encode(text: Any, encoding: Any = "latin1", errors: Any = "strict") -> bytes:
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, "latin1"); other codecs
    # (zlib, bz2, ...) are not part of that idiom and are refused.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    # ... and empty bytes as bytes(); bytes(n) or bytes(iterable) would be another matter.
    if args:
        raise _RefusedGlobal("builtins.bytes with arguments")
    return b""


# (module, name) -> what it loads as. A CIFAR batch holds dicts, lists, bytes/str and ints,
# plus numpy arrays; these are the globals numpy's pickles of plain numeric arrays use
# (numpy < 2 writes numpy.core, numpy >= 2 numpy._core). Nothing else is importable.
_CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer for core in ("core", "_core")},
    ("_codecs", "encode"): _latin1_encode,
    **{(builtins, "bytes"): _empty_bytes for builtins in ("builtins", "__builtin__")},
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch, resolving only the globals in ``_CIFAR_GLOBALS``."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            # protocol < 3 spells builtins the Python 2 way; name it as users know it
            module = "builtins" if module == "__builtin__" else module
            raise _RefusedGlobal(f"global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal("persistent id")


def _unpickle_cifar(path: Path) -> Any:
    """The object in CIFAR batch ``path``, unpickled without running code from it."""
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as e:
        raise DataError(
            f"refused CIFAR-10 batch {path}: it references {e.what}, which the CIFAR format "
            "never holds (only dicts, lists, bytes, str, ints and numeric numpy arrays); the "
            "file may be crafted to run code and was not loaded"
        ) from None
    except Exception as e:  # truncated or not a pickle: many exception types are possible
        raise DataError(f"cannot read CIFAR-10 batch {path}: {type(e).__name__}: {e}") from e


def _cifar_labels(path: Path, labels: Any, n: int) -> np.ndarray:
    """``labels`` (a list of ints, or an int array) as int64, checked against ``n`` rows."""
    if isinstance(labels, np.ndarray):
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise DataError(
                f"malformed CIFAR-10 batch {path}: 'labels' must be integers, got an array "
                f"of {labels.dtype} with shape {labels.shape}"
            )
        y = np.asarray(labels).astype(np.int64)
    elif isinstance(labels, (list, tuple)):
        for i, v in enumerate(labels):
            # str/bytes labels ("3", b"cat") would convert or fail deep inside numpy
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise DataError(
                    f"malformed CIFAR-10 batch {path}: 'labels' must be ints in 0..9, label "
                    f"{i} is {type(v).__name__} {v!r}"
                )
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    else:
        raise DataError(
            f"malformed CIFAR-10 batch {path}: 'labels' must be a list of ints, got "
            f"{type(labels).__name__}"
        )
    if y.shape != (n,):
        raise DataError(
            f"malformed CIFAR-10 batch {path}: {n} images in 'data' but {y.size} 'labels'"
        )
    if y.min() < 0 or y.max() > 9:
        raise DataError(f"malformed CIFAR-10 batch {path}: 'labels' must be ints in 0..9")
    return y


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle_cifar(path)
    if not isinstance(d, dict):
        raise DataError(
            f"malformed CIFAR-10 batch {path}: expected a dict, got {type(d).__name__}"
        )
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"malformed CIFAR-10 batch {path}: needs 'data' and 'labels' keys")
    x = d["data"]
    if (not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2
            or x.shape[1] != 3 * 32 * 32):
        what = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(
            f"malformed CIFAR-10 batch {path}: 'data' must be uint8 of shape (N, 3072), "
            f"got {what}"
        )
    x = np.asarray(x)  # the plain ndarray view of the checked array
    if x.shape[0] == 0:
        raise DataError(f"empty dataset: CIFAR-10 batch {path} holds 0 images")
    y = _cifar_labels(path, d["labels"], x.shape[0])
    return x.reshape(-1, 3, 32, 32), y


def _find_cifar(data_dir: Path) -> Path:
    folders = [data_dir / "cifar-10-batches-py", data_dir]
    for folder in folders:
        for f in CIFAR_FILES:
            if (folder / f).is_dir():
                raise DataError(
                    f"{folder / f} is a directory; expected the CIFAR-10 batch file {f} there"
                )
        if all((folder / f).is_file() for f in CIFAR_FILES):
            return folder
    raise DataFilesNotFound(
        f"CIFAR-10 files not found: expected {', '.join(CIFAR_FILES)} in one of: "
        f"{', '.join(str(f) for f in folders)}"
    )


def _load_cifar10(data_dir: Path) -> tuple[TensorDataset, TensorDataset]:
    folder = _find_cifar(data_dir)
    parts = [_read_cifar_batch(folder / f) for f in CIFAR_FILES]
    x_tr = np.concatenate([p[0] for p in parts[:5]])
    y_tr = np.concatenate([p[1] for p in parts[:5]])
    x_te, y_te = parts[5]

    def ds(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y))

    return ds(x_tr, y_tr), ds(x_te, y_te)


# ---- augmentation (training split only) -------------------------------------------------
CROP_PADDING = 4


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, *,
                  padding: int = CROP_PADDING, flip: bool = True) -> torch.Tensor:
    """The standard CIFAR augmentation of a batch ``(N, C, H, W)``: a random ``H x W`` crop of
    the image zero-padded by ``padding`` pixels on each side, then a horizontal flip with
    probability 1/2, drawn per sample from ``generator`` (offsets first, then flips)."""
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects (N, C, H, W) images, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    out = x
    if padding:
        off = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
        xp = torch.nn.functional.pad(x, (padding,) * 4)
        rows = (off[:, :1] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
        cols = (off[:, 1:] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
        idx = torch.arange(n)[:, None, None, None]
        out = xp[idx, torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if flip:
        mirror = torch.randint(0, 2, (n,), generator=generator).bool()
        out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


class AugmentCollate:
    """A DataLoader ``collate_fn`` that batches, then applies :func:`augment_batch`.

    In the main process it draws from ``generator`` (the train loader's own, which ``fit``
    reseeds per epoch and checkpoints, so the crops are a function of the seed and the
    epoch and resume exactly). A worker process draws from a generator seeded with the
    worker's seed (itself drawn from the loader's generator), so workers do not repeat
    each other's crops.
    """

    def __init__(self, generator: torch.Generator, padding: int = CROP_PADDING,
                 flip: bool = True) -> None:
        self.generator, self.padding, self.flip = generator, padding, flip
        self._worker: tuple[int, torch.Generator] | None = None

    def _gen(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.generator
        if self._worker is None or self._worker[0] != info.seed:
            self._worker = (info.seed, torch.Generator().manual_seed(info.seed))
        return self._worker[1]

    def __call__(self, batch: list[Any]) -> Any:
        x, y = torch.utils.data.default_collate(batch)
        return augment_batch(x, self._gen(), padding=self.padding, flip=self.flip), y


# ---- public API -------------------------------------------------------------------------
def load(
    name: str, data_dir: str | os.PathLike | None = None
) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` TensorDatasets of ``(x float32 in [0, 1], y int64)``.

    ``data_dir`` (for ``mnist`` / ``cifar10``; default ``$SPARSE_ADV_FAST_DATA`` or
    ``./data``) is searched as described in the module docstring. Missing files raise
    :class:`DataFilesNotFound` and malformed or refused ones :class:`DataError`, each
    naming what was expected and where.
    """
    _check_name(name)
    if name == "digits":
        return _load_digits()
    root = _data_dir(data_dir)
    _check_root(root, name)
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


def _check_augment(augment: Any) -> bool:
    if not isinstance(augment, bool):
        raise ValueError(f"augment must be True or False, got {augment!r}")
    return augment


def _ordered(ds: Any, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _shuffled(ds: Any, batch_size: int, num_workers: int, seed: int,
              augment: bool = False) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=True, generator=gen, num_workers=num_workers,
        collate_fn=AugmentCollate(gen) if augment else None,
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
    augment: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` for dataset ``name``.

    The train loader shuffles with its own generator seeded by ``seed`` (so the order does
    not depend on the global RNG, and ``fit`` checkpoints it); the test loader keeps order.
    ``train_subset`` / ``test_subset`` take a seeded random subset of that many samples.
    ``augment``: random crop (4-pixel zero padding) and horizontal flip of the training
    batches (:class:`AugmentCollate`), drawn from the train loader's generator.
    """
    _check_augment(augment)
    train, test = _datasets(name, data_dir, train_subset, test_subset, seed, batch_size,
                            num_workers)
    return (_shuffled(train, batch_size, num_workers, seed, augment),
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
    augment: bool = False,
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """``(train_loader, val_loader, test_loader)``: ``val_size`` training samples (a count,
    or a fraction in (0, 1); a seeded random choice) are held out for validation, so model
    selection and the catastrophic-overfitting check never look at the test split. Other
    arguments as :func:`loaders` (``augment`` applies to the training batches only, never
    to validation or test).
    """
    _check_augment(augment)
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
    return (_shuffled(train, batch_size, num_workers, seed, augment),
            _ordered(val, batch_size, num_workers),
            _ordered(test, batch_size, num_workers))


__all__ = [
    "CROP_PADDING", "DATASETS", "AugmentCollate", "DataError", "DataFilesNotFound",
    "augment_batch", "info", "load", "loaders", "split_loaders",
]
